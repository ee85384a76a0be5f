"""The words users type: formats, methods, dtypes, architectures, components, samplers.

The one list of each, for the library's argument checks and for the command line's choices.
Nothing here imports torch, so ``lorareg --help`` and the catalog commands can use it; the
format names are derived from :mod:`loralib.formats.table` when first asked for.
"""

from __future__ import annotations

from typing import Any

from .architectures import ARCHITECTURES, COMPONENTS
from .dtypes import STORAGE_DTYPES

_FROM_THE_TABLE = ("CATALOG_FORMATS", "FORMAT_NAMES", "HUB_LAYOUTS", "WRITE_FORMATS")
__all__ = ["ARCHITECTURE_NAMES", "CATALOG_SORTS", "COMPONENTS", "DYNAMIC_RULES", "KNOWN_ARCHITECTURES",
           "DEVICES", "FOLDER_WEIGHTS", "MERGE_METHODS", "SCHEDULERS", "STORAGE_DTYPES", "SVD_METHODS", *_FROM_THE_TABLE]

# Architectures lorareg converts and merges for (and builds tiny models of); and every one it can name.
ARCHITECTURE_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)
KNOWN_ARCHITECTURES: tuple[str, ...] = (*ARCHITECTURE_NAMES, "unknown")

MERGE_METHODS = ("concat", "linear", "ties", "dare")
SVD_METHODS = ("auto", "exact", "randomized")
DYNAMIC_RULES = ("sv_ratio", "sv_fro", "sv_cumulative")
CATALOG_SORTS = ("name", "added", "updated", "size")
DEVICES = ("auto", "cpu", "cuda")  # where composition computes (loralib.device)
# The weight files that make a folder an adapter (PEFT, diffusers): the folder layouts of the format
# table, spelled out so that a rescan need not import the readers (tests/test_vocabulary.py compares).
FOLDER_WEIGHTS = frozenset({"adapter_model.safetensors", "adapter_model.bin", "pytorch_lora_weights.safetensors"})

# lorareg's sampler names -> (diffusers scheduler class, extra config, A1111 sampler name)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}


def __getattr__(name: str) -> Any:
    """The names that come from the format table, computed on first use: importing the table
    costs more than the catalog commands, which need none of them, should pay at start-up."""
    if name not in _FROM_THE_TABLE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .formats.detect import FOREIGN_KINDS
    from .formats.table import FORMATS, WRITE_FORMATS

    # Every format name a file can be recorded under (the spellings lorareg reads).
    format_names = tuple(dict.fromkeys(kind.format for fmt in FORMATS for kind in fmt.kinds))
    derived = {
        "WRITE_FORMATS": WRITE_FORMATS,
        "FORMAT_NAMES": format_names,
        # Every format the catalog records: those lorareg reads and the other adapter kinds it names.
        "CATALOG_FORMATS": (*format_names, *FOREIGN_KINDS),
        # Extra layouts ``push --also`` uploads beside the kohya file.
        "HUB_LAYOUTS": tuple(n for n in WRITE_FORMATS if n != "kohya"),
    }
    globals().update(derived)
    return derived[name]
