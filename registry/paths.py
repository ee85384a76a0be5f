"""How the catalog spells paths: absolute and normalised, and only names SQLite can store."""

from __future__ import annotations

import os
from pathlib import Path


def storable(path: str | os.PathLike) -> bool:
    """True for a path the catalog can record: SQLite stores text, so the name must be valid UTF-8."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def absolute(path: str | os.PathLike) -> Path:
    """An absolute, normalised path (symlinks kept: a Hub snapshot path stays a snapshot path)."""
    return Path(os.path.abspath(os.path.expanduser(path)))
