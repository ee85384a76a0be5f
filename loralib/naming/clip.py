"""How the installed transformers spells the module paths of a CLIP text encoder, decided without
importing it.

``CLIPTextModelWithProjection`` (SDXL's second text encoder, SD3's first two) keeps its layers
under ``.text_model``; ``CLIPTextModel`` did too until transformers 5.6, which flattened it (its
layers sit at the top: ``encoder.layers.0…``); T5 never had it. PEFT files must spell module paths the way the live model
does, so the PEFT writer asks here. Reading the installed version from the package metadata costs
microseconds, where building a model to look took seconds (importing transformers and torch).
"""

from __future__ import annotations

from functools import cache

from ..architectures import CLIP, CLIP_PROJECTION, TEXT_ENCODER_2
from . import TE_ROOT

FLAT_CLIP_TEXT_MODEL = (5, 6)  # the first transformers release whose CLIPTextModel has no .text_model


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``5.6.0``, ``5.6.0rc1`` or ``4.57.1.dev0``."""
    numbers = []
    for part in version.split(".")[:2]:
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        numbers.append(int(digits or 0))
    return (numbers + [0, 0])[0], (numbers + [0, 0])[1]


def installed_transformers() -> str | None:
    """The installed transformers' version, or None when it is not installed."""
    from importlib import metadata  # not at the top: importing it costs more than a catalog command's start-up

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def nests_text_model(component: str, transformers_version: str | None, class_name: str | None = None) -> bool:
    """True when that transformers version nests this text encoder's layers under ``.text_model``.

    ``class_name`` is the component's transformers class (default: ``CLIPTextModelWithProjection``
    for ``text_encoder_2``, ``CLIPTextModel`` otherwise). Without transformers installed the newest
    layout is assumed (what a fresh install would build).
    """
    if class_name is None:
        class_name = CLIP_PROJECTION if component == TEXT_ENCODER_2 else CLIP
    if class_name == CLIP_PROJECTION:
        return True
    if class_name != CLIP or transformers_version is None:
        return False
    return release(transformers_version) < FLAT_CLIP_TEXT_MODEL


@cache
def text_model_prefix(component: str, class_name: str | None = None) -> str:
    """``"text_model."`` if the installed transformers nests this text encoder's layers (of class
    ``class_name``, see :func:`nests_text_model`) under ``.text_model``, else ``""``."""
    return TE_ROOT + "." if nests_text_model(component, installed_transformers(), class_name) else ""
