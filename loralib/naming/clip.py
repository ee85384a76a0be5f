"""How the installed transformers spells the module paths of a CLIP text encoder, decided without
importing it.

``CLIPTextModelWithProjection`` (SDXL's second text encoder) keeps its layers under
``.text_model``; ``CLIPTextModel`` did too until transformers 5.6, which flattened it (its layers
sit at the top: ``encoder.layers.0…``). PEFT files must spell module paths the way the live model
does, so the PEFT writer asks here. Reading the installed version from the package metadata costs
microseconds, where building a model to look took seconds (importing transformers and torch).
"""

from __future__ import annotations

from functools import cache

from ..architectures import TEXT_ENCODER_2
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


def nests_text_model(component: str, transformers_version: str | None) -> bool:
    """True when that transformers version nests this text encoder's layers under ``.text_model``.

    Without transformers installed the newest layout is assumed (what a fresh install would build).
    """
    if component == TEXT_ENCODER_2:
        return True
    if transformers_version is None:
        return False
    return release(transformers_version) < FLAT_CLIP_TEXT_MODEL


@cache
def text_model_prefix(component: str) -> str:
    """``"text_model."`` if the installed transformers nests this text encoder's layers under
    ``.text_model``, else ``""``."""
    return TE_ROOT + "." if nests_text_model(component, installed_transformers()) else ""
