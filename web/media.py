"""Images the pages may show: only the sample images and preview images the catalog knows of.

A URL never carries a path: it names an entry and a sample number (``/media/12/sample/0``) or
the entry's preview (``/media/12/preview``), and the path comes from the catalog. The file must
then be a regular file (a symbolic link is refused), at most :data:`MAX_BYTES`, and start like
a PNG, JPEG, WebP or GIF image; its type comes from those bytes, not from its name.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lorareg.registry.records import Entry
from lorareg.registry.samples import image_format, preview_path

MAX_BYTES = 32 << 20


def read_image(path: str | os.PathLike) -> tuple[bytes, str] | None:
    """The bytes and type of the image at ``path``; None for anything else (missing, link, not an image, too big)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_BYTES:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    kind = image_format(data[:12])
    return (data, f"image/{kind}") if kind and len(data) <= MAX_BYTES else None


def sample_path(entry: Entry, index: int) -> str | None:
    """The recorded path of sample ``index`` of ``entry``."""
    if 0 <= index < len(entry.samples) and isinstance(entry.samples[index], dict):
        path = entry.samples[index].get("path")
        return str(path) if path else None
    return None


def preview_of(paths: list[str]) -> str | None:
    """The preview image beside the first of an entry's files that has one."""
    for path in paths:
        found = preview_path(path)
        if found:
            return found
    return None


def card_image(entry_id: int, samples: list[dict], paths: list[str]) -> str | None:
    """The URL of the image a card shows: the first sample that exists, else the preview beside the file."""
    for index, sample in enumerate(samples):
        if isinstance(sample, dict) and sample.get("path") and Path(str(sample["path"])).is_file():
            return f"/media/{entry_id}/sample/{index}"
    return f"/media/{entry_id}/preview" if preview_of(paths) else None
