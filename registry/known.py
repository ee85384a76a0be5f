"""What the catalog already knows of an input adapter: its hashes, so an operation need not hash it again.

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
    """The hashes the catalog at ``home`` holds for the adapter at ``path`` (a file, or a folder such as
    PEFT's, or its weights file) if its weights are unchanged since they were recorded; None otherwise
    (no catalog, an unknown or changed file, a folder whose weights are several files, a catalog that
    cannot be read).

    An adapter's hashes are those of its weights file: a PEFT folder's identity, with one weights
    file, is that file's (:func:`loralib.files.hashes.adapter_hashes`)."""
    from loralib.formats.layout import adapter_files, adapter_root, main_file

    from .catalog import Catalog

    path = absolute(path)
    if not catalog_path(home).is_file():
        return None
    root = adapter_root(path) if path.is_file() else path
    weights = [f for f in adapter_files(root) if f.suffix.lower() == ".safetensors"]
    if len(weights) != 1 or weights[0] != main_file(root) or not weights[0].is_file():
        return None
    stat = weights[0].stat()
    try:
        with Catalog(home) as catalog:
            return catalog.file_hashes(weights[0], stat.st_size, stat.st_mtime_ns)
    except (LoraError, OSError):  # an unusable catalog only means hashing the file as usual
        return None


__all__ = ["known_hashes"]
