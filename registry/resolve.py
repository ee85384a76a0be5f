"""Turn what a user typed for an adapter into a local path.

In this order: an existing file or folder; a catalog name; a hash prefix (tensor SHA-256 =
AutoV3/A1111 12 hex, file SHA-256 = AutoV2 10 hex, legacy 8 hex; at least 8 digits, optionally
``sha256:``/``0x``); a Hub repo id ``user/repo[@revision]``, downloaded into the Hugging Face
cache, verified and registered. An existing path never opens the catalog.
"""

from __future__ import annotations

import os
from pathlib import Path

from loralib.errors import InputNotFoundError

from .home import catalog_path

_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".json")


def resolve(reference: str, home: str | os.PathLike | None = None, *, allow_hub: bool = True) -> Path:
    """The local path of an adapter reference (see the module docstring).

    Raises :class:`~loralib.errors.InputNotFoundError` when nothing matches, with one line
    saying what was tried.
    """
    from .catalog import Catalog

    path = Path(reference).expanduser()
    if path.exists():
        return path
    if catalog_path(home).exists():
        with Catalog(home) as catalog:
            entry = catalog.find(reference)
            if entry is not None:
                return catalog.local_path(entry)
    if allow_hub and not reference.lower().endswith(_FILE_SUFFIXES):
        from loralib.hub_ids import is_repo_ref, parse_repo_ref

        from .hub import find_pulled, offline, pull

        if is_repo_ref(reference):
            repo_id, revision = parse_repo_ref(reference)
            with Catalog(home) as catalog:
                if offline():
                    entry = find_pulled(catalog, repo_id, revision)
                    if entry is not None:
                        return catalog.local_path(entry)
                return pull(catalog, reference).path
    raise InputNotFoundError(f"{reference} is not a file, a catalog name, a hash prefix or a Hub repo id",
                             "Check the path, or see `lorareg list`")
