"""The workspace: the one folder the web UI reads and writes, and the checks that keep it there.

Every path the UI is given (a query parameter, a config value, a backend folder) is resolved
here. A path is refused when it holds a ``..`` component, or when the real path it names (every
symlink followed, the missing tail included) lies outside the workspace's real path: a symlink
inside the workspace that points out of it is an escape, not a shortcut. Absolute paths are
accepted only when they resolve inside the workspace (the UI hands back paths the server
resolved). Refusals are ``PathRefused`` (HTTP 403); a path that is fine but absent is
``PathMissing`` (HTTP 404).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

# The UI's own files (job logs, the run lock) live in this folder of the workspace.
STATE_FOLDER = ".slider-cn-ui"


class PathRefused(Exception):
    """A path outside the workspace (or written with ``..``): HTTP 403."""

    status = 403


class PathMissing(Exception):
    """A path inside the workspace that does not exist: HTTP 404."""

    status = 404


class Workspace:
    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise NotADirectoryError(f"workspace folder not found: {root}")
        self.root = Path(os.path.realpath(root))

    # --- checks --------------------------------------------------------------------------

    def contains(self, path: str | Path) -> bool:
        """Whether ``path`` (absolute, or relative to the workspace), with every symlink
        followed, lies inside the workspace."""
        real = os.path.realpath(self.root / Path(path).expanduser())
        return real == str(self.root) or real.startswith(str(self.root) + os.sep)

    def resolve(self, path: str | None, *, must_exist: bool = False) -> Path:
        """The real path of a workspace path given by a client; refuses escapes."""
        text = "" if path is None else str(path)
        if "\x00" in text:
            raise PathRefused("a path cannot contain a NUL character")
        if ".." in PurePosixPath(text.replace("\\", "/")).parts:
            raise PathRefused(f"'..' is not allowed in a path: {text!r}")
        candidate = self.root / Path(text).expanduser() if text else self.root
        if not self.contains(candidate):
            raise PathRefused(f"{text!r} is outside the workspace {self.root}")
        real = Path(os.path.realpath(candidate))
        if must_exist and not real.exists():
            raise PathMissing(f"not found in the workspace: {text}")
        return real

    def relative(self, path: str | Path) -> str:
        """A path inside the workspace as the client sees it: relative, with forward slashes."""
        real = Path(os.path.realpath(self.root / Path(path)))
        return real.relative_to(self.root).as_posix() if real != self.root else "."

    # --- the UI's own folder ------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        folder = self.root / STATE_FOLDER
        folder.mkdir(exist_ok=True)
        return folder

    # --- listings ------------------------------------------------------------------------

    def folders(self, limit: int = 500, depth: int = 5) -> list[str]:
        """Folders of the workspace (relative, sorted; the UI's own and hidden ones left out),
        for the folder fields' suggestions. Symlinked folders that leave it are skipped."""
        found: list[str] = []
        for current, dirs, _files in os.walk(self.root):
            rel = Path(current).relative_to(self.root)
            dirs[:] = sorted(
                d for d in dirs if not d.startswith(".") and self.contains(Path(current) / d)
            )
            if len(rel.parts) >= depth:
                dirs[:] = []
            if rel.parts:
                found.append(rel.as_posix())
                if len(found) >= limit:
                    break
        return found

    def listing(self, path: str | None) -> list[dict]:
        """The entries of one folder: name, kind (dir / file) and size."""
        folder = self.resolve(path, must_exist=True)
        if not folder.is_dir():
            raise PathMissing(f"not a folder: {path}")
        entries = []
        for entry in sorted(folder.iterdir(), key=lambda p: (not p.is_dir(), p.name)):
            if entry.name == STATE_FOLDER or not self.contains(entry):
                continue
            is_dir = entry.is_dir()
            entries.append(
                {
                    "name": entry.name,
                    "path": self.relative(entry),
                    "kind": "dir" if is_dir else "file",
                    "size": None if is_dir else entry.stat().st_size,
                }
            )
        return entries
