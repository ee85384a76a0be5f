"""Reading, hashing and atomically writing safetensors files, without torch where possible."""

from __future__ import annotations

import os
from pathlib import Path

# Formats that torch.load unpickles: reading one runs code stored in it, so never without consent.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def is_pickle(path: str | os.PathLike) -> bool:
    """True for a file whose name says it is a pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``, ``.pkl``)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES
