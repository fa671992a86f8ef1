"""The output folder's manifest: what each output was made from, so a rerun redoes only what
changed (source size or modification time, detector, parameters, resolution or weights)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST_NAME = ".slider-cn-conditioning.json"
FORMAT = 1


class Manifest:
    def __init__(self, path: Path, files: dict[str, dict[str, Any]] | None = None):
        self.path = path
        self.files: dict[str, dict[str, Any]] = files or {}

    @classmethod
    def load(cls, output_dir: Path) -> Manifest:
        path = output_dir / MANIFEST_NAME
        if not path.is_file():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT or not isinstance(raw.get("files"), dict):
                raise ValueError(f"unexpected format {raw.get('format')!r}")
        except (OSError, ValueError, AttributeError) as exc:
            # Losing the manifest only costs a full rerun; never a reason to stop.
            log.warning("ignoring unreadable manifest %s (%s): every file is redone", path, exc)
            return cls(path)
        return cls(path, raw["files"])

    def is_current(self, rel: str, stat: os.stat_result, settings: dict[str, Any]) -> bool:
        entry = self.files.get(rel)
        if entry is None:
            return False
        return (
            entry.get("source_size") == stat.st_size
            and entry.get("source_mtime_ns") == stat.st_mtime_ns
            and all(entry.get(key) == value for key, value in settings.items())
            and (self.path.parent / entry.get("output", "")).is_file()
        )

    def record(self, rel: str, output: str, stat: os.stat_result, settings: dict[str, Any]):
        self.files[rel] = {
            "output": output,
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            **settings,
        }

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        blob = {"format": FORMAT, "files": dict(sorted(self.files.items()))}
        tmp.write_text(json.dumps(blob, indent=1) + "\n")
        os.replace(tmp, self.path)
