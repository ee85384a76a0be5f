"""Every file format lorareg reads or writes, in detection order.

Adding a format is adding a module that exports a :class:`~loralib.formats.base.Format` and
listing it here (see docs/formats.md). Order matters where spellings overlap: a PEFT key also
reads as a current diffusers key, so PEFT comes first; LyCORIS files also spell their LoCon
modules the kohya way, so kohya (which reads only plain files) comes before LyCORIS; a diffusers
file with ``.alpha`` keys is also read by OneTrainer's INTERNAL reader, so diffusers comes first.
"""

from __future__ import annotations

from . import cloneofsimo, comfyui, diffusers, kohya, lycoris, omi, onetrainer, peft, xlabs
from .base import Format, Kind

FORMATS: tuple[Format, ...] = (kohya.FORMAT, lycoris.FORMAT, peft.FORMAT, diffusers.FORMAT, cloneofsimo.FORMAT,
                               comfyui.FORMAT, onetrainer.INTERNAL_FORMAT, onetrainer.ORIGINAL_FORMAT, omi.FORMAT,
                               xlabs.FORMAT)
WRITE_FORMATS: tuple[str, ...] = tuple(f.name for f in FORMATS if f.write is not None)


def by_name(name: str) -> Format | None:
    """The format called ``name`` (case-insensitive), or None."""
    wanted = name.strip().lower()
    return next((f for f in FORMATS if f.name == wanted), None)


def for_kind(kind: Kind) -> Format | None:
    """The format that reads files of ``kind``, or None (checkpoints, embeddings, unsupported kinds)."""
    return next((f for f in FORMATS if kind in f.kinds), None)


def folder_formats() -> tuple[Format, ...]:
    """The formats that store an adapter as a folder of known files."""
    return tuple(f for f in FORMATS if f.folder is not None)
