"""Sample images recorded with an adapter (shown in ``show`` and as the model card's widget).

The prompt of a sample is read from the PNG text chunk ``parameters`` that AUTOMATIC1111 (and
``lorareg generate``) write: its first line is the prompt. Only the PNG chunk headers are
parsed, with the standard library.
"""

from __future__ import annotations

import os
import struct
import zlib

from loralib.errors import InputNotFoundError

from .describe import absolute

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_text(path: str | os.PathLike) -> dict[str, str]:
    """The ``tEXt``/``zTXt``/``iTXt`` entries of a PNG file (empty for other files or damaged ones)."""
    found: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return found
            while True:
                head = f.read(8)
                if len(head) < 8:
                    break
                length, kind = struct.unpack(">I4s", head)
                if kind == b"IEND" or length > 64 * 1024 * 1024:
                    break
                body = f.read(length)
                f.seek(4, os.SEEK_CUR)  # CRC
                if kind in (b"tEXt", b"zTXt", b"iTXt"):
                    _text_chunk(kind, body, found)
    except (OSError, struct.error, zlib.error, UnicodeDecodeError):
        return found
    return found


def _text_chunk(kind: bytes, body: bytes, found: dict[str, str]) -> None:
    keyword, _, rest = body.partition(b"\0")
    key = keyword.decode("latin-1")
    if kind == b"tEXt":
        found[key] = rest.decode("latin-1")
    elif kind == b"zTXt":
        found[key] = zlib.decompress(rest[1:]).decode("latin-1")
    else:  # iTXt: compression flag, method, language tag, translated keyword, text
        compressed, rest = rest[0], rest[2:]
        _, _, rest = rest.partition(b"\0")
        _, _, text = rest.partition(b"\0")
        found[key] = (zlib.decompress(text) if compressed else text).decode("utf-8")


def sample_record(path: str | os.PathLike, prompt: str | None = None) -> dict:
    """A sample image as the catalog stores it: ``{"path", "prompt"}`` (prompt read from the PNG if not given)."""
    image = absolute(path)
    if not image.is_file():
        raise InputNotFoundError(f"the sample image {path} does not exist", "Check the path")
    if prompt is None:
        parameters = png_text(image).get("parameters", "")
        prompt = parameters.split("\n", 1)[0].strip() or None
    return {"path": str(image), "prompt": prompt}



# Where other tools keep an adapter's preview image: beside the file, named after it (AUTOMATIC1111,
# Forge, ComfyUI-Lora-Manager and Civitai helpers write ``NAME.preview.png``).
PREVIEW_SUFFIXES = (".preview.png", ".preview.jpg", ".preview.jpeg", ".preview.webp", ".png", ".jpg", ".jpeg",
                    ".webp")


def preview_path(adapter_path: str | os.PathLike) -> str | None:
    """The preview image stored beside an adapter file (``NAME.preview.png`` and the like), if there is one."""
    path = absolute(adapter_path)
    if not os.path.isdir(path.parent):  # one check instead of eight for a file that moved away
        return None
    stem = str(path if path.is_dir() else path.with_suffix(""))
    for suffix in PREVIEW_SUFFIXES:
        if os.path.isfile(stem + suffix):
            return stem + suffix
    return None
