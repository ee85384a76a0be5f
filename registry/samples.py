"""Sample images recorded with an adapter (shown in ``show``, uploaded by ``push`` as the model card's widget).

A sample is an image file made with the adapter: ``lorareg generate`` outputs and training samples
are attached to the entries of every adapter they used, and ``add --sample`` attaches any image
(PNG, JPEG, WebP or GIF, recognised by its first bytes). What an image records is read from the
PNG text chunk ``parameters`` that AUTOMATIC1111 (and lorareg) write: the prompt (its first
lines), the negative prompt, and the settings line (``Steps: 20, Sampler: Euler a, CFG scale: 7,
Seed: 7, Size: 512x512, Model hash: …, Lora hashes: "name: hash"``); the adapter's weight comes
from the prompt's ``<lora:name:weight>`` tag. Only the PNG chunk headers are parsed, with the
standard library.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib

from loralib.errors import InputNotFoundError, InvalidArgumentError

from .paths import absolute

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LORA_TAG = re.compile(r"<lora:([^:>]+):([^:>]+)(?::[^>]*)?>")


def image_kind(path: str | os.PathLike) -> str | None:
    """``png``, ``jpeg``, ``webp`` or ``gif`` for a regular file whose first bytes (its magic number)
    say so; None for anything else (a FIFO or device is not opened)."""
    from loralib.files import file_kind

    if file_kind(path) is not None:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    return image_format(head)


def image_format(head: bytes) -> str | None:
    """``png``, ``jpeg``, ``webp`` or ``gif`` for a file starting with ``head`` (12 bytes suffice), else None."""
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


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


def _settings(line: str) -> dict[str, str]:
    """A1111's settings line, ``Key: value, Key: "quoted, value"``, as a dictionary."""
    found: dict[str, str] = {}
    for match in re.finditer(r'\s*([\w][\w \-/()]*?):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)', line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value.strip('"')
        found[key] = value
    return found


def parse_parameters(text: str) -> dict:
    """The A1111 ``parameters`` text as ``{"prompt", "negative_prompt", "settings", "loras"}``.

    ``loras`` maps each ``<lora:name:weight>`` of the prompt to its weight; ``settings`` holds the
    last line's fields (Steps, Sampler, CFG scale, Seed, Size, Model hash, Lora hashes, …).
    """
    lines = text.strip().split("\n")
    settings: dict[str, str] = {}
    if len(lines) > 1 and re.match(r"^\s*Steps:\s", lines[-1]):
        settings = _settings(lines.pop())
    negative = ""
    for i, line in enumerate(lines):
        if line.startswith("Negative prompt:"):
            negative = "\n".join([line.removeprefix("Negative prompt:").strip(), *lines[i + 1:]]).strip()
            lines = lines[:i]
            break
    prompt = "\n".join(lines).strip()
    loras = {}
    for name, weight in _LORA_TAG.findall(prompt):
        try:
            loras[name] = float(weight)
        except ValueError:
            continue
    return {"prompt": prompt, "negative_prompt": negative, "settings": settings, "loras": loras}


def lora_hashes(settings: dict[str, str]) -> dict[str, str]:
    """The ``Lora hashes`` field (``name: hash, name: hash``) as name -> A1111 hash."""
    found = {}
    for part in settings.get("Lora hashes", "").split(","):
        name, _, value = part.strip().rpartition(":")
        if name and value.strip():
            found[name.strip()] = value.strip().lower()
    return found


def sample_record(path: str | os.PathLike, prompt: str | None = None, *, a1111_hash: str | None = None,
                  weight: float | None = None, source: str | None = None) -> dict:
    """A sample image as the catalog stores it.

    ``{"path", "prompt", "negative_prompt", "seed", "weight", "parameters", "source"}``: the prompt
    (without ``<lora:…>`` tags), seed and settings are read from the PNG's ``parameters`` unless
    ``prompt`` is given; the weight is the one the prompt gives the adapter whose A1111 hash is
    ``a1111_hash`` (else ``weight``). Raises :class:`InvalidArgumentError` for a file that is not an
    image.
    """
    image = absolute(path)
    if not image.is_file():
        raise InputNotFoundError(f"the sample image {path} does not exist", "Check the path")
    kind = image_kind(image)
    if kind is None:
        raise InvalidArgumentError(f"{path} is not an image (PNG, JPEG, WebP or GIF)",
                                   "Give an image rendered with the adapter")
    parsed = parse_parameters(png_text(image).get("parameters", "")) if kind == "png" else None
    record: dict = {"path": str(image), "prompt": prompt}
    if parsed is not None:
        settings = parsed["settings"]
        if prompt is None:
            record["prompt"] = _LORA_TAG.sub("", parsed["prompt"]).strip() or None
        if parsed["negative_prompt"]:
            record["negative_prompt"] = parsed["negative_prompt"]
        if settings.get("Seed", "").lstrip("-").isdigit():
            record["seed"] = int(settings["Seed"])
        found = _weight(parsed, a1111_hash) if a1111_hash else None
        weight = found if found is not None else weight
        if settings:
            record["parameters"] = {k: v for k, v in settings.items() if k not in ("Seed", "Version")}
    if weight is not None:
        record["weight"] = float(weight)
    if source:
        record["source"] = source
    return record


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


def _weight(parsed: dict, a1111_hash: str) -> float | None:
    """The weight the prompt gives the adapter with this A1111 hash (named in ``Lora hashes``)."""
    wanted = a1111_hash.lower()[:12]
    for name, value in lora_hashes(parsed["settings"]).items():
        if value[:12] == wanted and name in parsed["loras"]:
            return parsed["loras"][name]
    return None
