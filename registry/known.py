"""What the catalog already knows of an input file: its hashes, so an operation need not hash it again.

An operation records its inputs' hashes (their identity, tensor and file SHA-256) in the output's
history. For a file the catalog holds, unchanged since (the same size and modification time, as a
rescan trusts), those are already known; hashing the file again is two passes over its bytes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from loralib.errors import LoraError

from .home import catalog_path
from .paths import absolute

if TYPE_CHECKING:
    from loralib.files.hashes import FileHashes


def known_hashes(path: str | os.PathLike, home: str | os.PathLike | None = None) -> FileHashes | None:
    """The hashes the catalog at ``home`` holds for the single-file adapter at ``path``, if the file is
    unchanged since they were recorded; None otherwise (no catalog, an unknown or changed file, an
    adapter stored as a folder, a catalog that cannot be read)."""
    from loralib.formats.layout import adapter_root

    from .catalog import Catalog

    path = absolute(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file() or adapter_root(path) != path \
            or not catalog_path(home).is_file():
        return None
    stat = path.stat()
    try:
        with Catalog(home) as catalog:
            return catalog.file_hashes(path, stat.st_size, stat.st_mtime_ns)
    except (LoraError, OSError):  # an unusable catalog only means hashing the file as usual
        return None


__all__ = ["known_hashes"]
