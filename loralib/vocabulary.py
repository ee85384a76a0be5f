"""The words users type: formats, methods, dtypes, architectures, components, samplers.

The one list of each, for the library's argument checks and for the command line's choices.
Nothing here imports torch, so ``lorareg --help`` and the catalog commands can use it.
"""

from __future__ import annotations

from .architectures import ARCHITECTURES, COMPONENTS
from .dtypes import STORAGE_DTYPES
from .formats.table import FORMATS, WRITE_FORMATS

__all__ = ["ARCHITECTURE_NAMES", "CATALOG_SORTS", "COMPONENTS", "DYNAMIC_RULES", "FORMAT_NAMES", "HUB_LAYOUTS",
           "KNOWN_ARCHITECTURES", "MERGE_METHODS", "SCHEDULERS", "STORAGE_DTYPES", "SVD_METHODS", "WRITE_FORMATS"]

# Architectures lorareg converts and merges for (and builds tiny models of); and every one it can name.
ARCHITECTURE_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)
KNOWN_ARCHITECTURES: tuple[str, ...] = (*ARCHITECTURE_NAMES, "unknown")
# Every format name a file can be recorded under (the spellings lorareg reads).
FORMAT_NAMES: tuple[str, ...] = tuple(dict.fromkeys(kind.format for fmt in FORMATS for kind in fmt.kinds))
# Extra layouts ``push --also`` uploads beside the kohya file.
HUB_LAYOUTS: tuple[str, ...] = tuple(name for name in WRITE_FORMATS if name != "kohya")

MERGE_METHODS = ("concat", "linear", "ties", "dare")
SVD_METHODS = ("auto", "exact", "randomized")
DYNAMIC_RULES = ("sv_ratio", "sv_fro", "sv_cumulative")
CATALOG_SORTS = ("name", "added", "updated", "size")

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
