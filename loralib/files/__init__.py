"""Reading, hashing and atomically writing safetensors files, without torch where possible."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InputNotFoundError, InvalidArgumentError

# Formats that torch.load unpickles: reading one runs code stored in it, so never without consent.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

_SPECIAL = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


def is_pickle(path: str | os.PathLike) -> bool:
    """True for a file whose name says it is a pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``, ``.pkl``)."""
    return (path if isinstance(path, Path) else Path(path)).suffix.lower() in PICKLE_SUFFIXES


def special_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists but is not a regular file ("a FIFO (named pipe)", "a socket",
    "a character device", "a folder"…); None for a regular file or a missing path. Links are followed."""
    kind = file_kind(path)
    return None if kind == "missing" else kind


def require_regular_file(path: str | os.PathLike, what: str = "file") -> None:
    """Raise unless ``path`` is a regular file: opening a FIFO would block forever, a device never ends.

    A missing path is an :class:`~loralib.errors.InputNotFoundError`; anything else that is not a
    regular file an :class:`~loralib.errors.InvalidArgumentError`. Checked before the file is opened.
    """
    kind = file_kind(path)
    if kind == "missing":
        raise InputNotFoundError(f"{path} does not exist", "Check the path")
    if kind is not None:
        raise InvalidArgumentError(f"{path} is {kind}, not a {what}", f"Give the path of a {what}")


def file_kind(path: str | os.PathLike) -> str | None:
    """None for a regular file, ``"missing"`` for a path that does not exist (or cannot be looked
    at), else what :func:`special_kind` says it is: one ``stat`` (callers check files by the thousand)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return "missing"
    return None if stat.S_ISREG(mode) else _SPECIAL.get(stat.S_IFMT(mode), "not a regular file")
