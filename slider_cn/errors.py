"""User-facing errors and the small helpers that word them: one leaf module every other imports.

A ``ConfigError`` is bad user input (a config key, a data file, a command-line flag); the CLI
prints its message and exits 2. Messages name the file, the key and what to do.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """Bad user input in a config file or on the command line. The CLI prints it and exits 2."""


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def read_json(path: Path, what: str = "config") -> Any:
    """Read a JSON file; a missing file or malformed JSON is a ConfigError with line and column."""
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
