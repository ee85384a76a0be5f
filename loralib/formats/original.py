"""What the readers of files that use the original models' module names share.

ComfyUI, OneTrainer's ORIGINAL spelling and OMI name the denoiser's modules as the original
checkpoints do — Stability's SGM/LDM paths for SD1.x/SD2.x/SDXL (``input_blocks.4.1.proj_in``),
Black Forest Labs' for Flux.1 (``double_blocks.0.img_attn.qkv``), Stability's MMDiT for SD3
(``joint_blocks.0.x_block.attn.qkv``) — behind a prefix of their own. Here those paths are
resolved to internal keys (fused layers to several, with their rows), a file's family is told
from its paths, and a file's modules become :class:`~loralib.formats.base.ModuleEntry` objects;
a key that names nothing is an error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from ..architectures import FLUX_FAMILY, SD, SD1, SD3_FAMILY, SDXL, UNET, claimed_architecture, family_of
from ..errors import CorruptFileError
from ..naming import Target
from ..naming.flux import FLUX_MAP
from ..naming.flux import ROOTS as BFL_ROOTS
from ..naming.native import NativeMap
from ..naming.sd3 import ROOTS as MMDIT_ROOTS
from ..naming.sd3 import SD3_MAP
from ..naming.sgm import SGM_ROOTS, UNetLayout, sgm_to_diffusers
from .base import AdapterIndex, Kind, ModuleEntry
from .kohya import add_entries, fused_entries, refuse_unplaced, stored_shape
from .source import TensorSource

NATIVE_MAPS: dict[str, NativeMap] = {FLUX_FAMILY: FLUX_MAP, SD3_FAMILY: SD3_MAP}
# First segments only one family's original names have.
_FLUX_ONLY = tuple(r for r in BFL_ROOTS if r not in MMDIT_ROOTS)
_SD3_ONLY = tuple(r for r in MMDIT_ROOTS if r not in BFL_ROOTS)
NATIVE_ROOTS = tuple(dict.fromkeys((*SGM_ROOTS, *BFL_ROOTS, *MMDIT_ROOTS)))
# Suffixes of LoRA factors, kohya's and PEFT's, and what each factor is.
FACTORS = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
           "lora_mid.weight": "mid", "alpha": "alpha"}
FACTOR_SUFFIX = r"(lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|lora_mid\.weight|alpha)"
_CROSS = re.compile(r"\.attn2\.to_[kv]$")


def path_family(paths: Iterable[str], hint: str | None = None, metadata: dict[str, str] | None = None
                ) -> tuple[str, bool]:
    """The family of a file's original denoiser paths, and whether the names say so for certain.

    SGM roots say ``sd``, BFL roots ``flux``, MMDiT roots ``sd3``; ``hint`` (what the file's text
    encoders say) or else the metadata decides a tie (paths both families have, or none).
    """
    paths = list(paths)
    first = {p.split(".", 1)[0] for p in paths}
    if first & set(_FLUX_ONLY):
        return FLUX_FAMILY, True
    if first & set(_SD3_ONLY):
        return SD3_FAMILY, True
    if first & set(SGM_ROOTS):
        return SD, True
    if hint is not None:
        return hint, True
    if not paths:
        return SD, True
    claim = family_of(claimed_architecture(metadata) or "")
    return (claim if claim in (FLUX_FAMILY, SD3_FAMILY) else FLUX_FAMILY), False


def sgm_layout(cross_widths: Iterable[int]) -> UNetLayout:
    """SGM numbering differs between SD1/SD2 and SDXL: SD1's when cross-attention is 768 or 1024 wide."""
    widths = set(cross_widths)
    if widths & {768, 1024} and 2048 not in widths:
        return UNetLayout.from_config(SD1.unet_config)
    return UNetLayout.from_config(SDXL.unet_config)


def native_target(family: str, path: str, shape: tuple[int, int] | None, layout: UNetLayout | None,
                  split_parts: bool = False) -> Target | None:
    """The internal module(s) an original denoiser path names in ``family``, or None.

    ``split_parts``: a fused layer may also be named one part at a time, ``qkv.0``, ``qkv.1``…
    (OMI's spelling); such a name stands for that part alone.
    """
    if family == SD:
        diffusers = sgm_to_diffusers(path, layout) if layout is not None and path.split(".", 1)[0] in SGM_ROOTS else None
        return Target((f"{UNET}.{diffusers}",)) if diffusers is not None else None
    native_map = NATIVE_MAPS[family]
    target = native_map.to_target(path, shape)
    if target is None and split_parts and (match := re.fullmatch(r"(.+)\.(\d+)", path)):
        whole = native_map.to_target(match.group(1))
        part = int(match.group(2))
        if whole is not None and whole.fused and part < len(whole.keys):
            return Target((whole.keys[part],))
    return target


def index_groups(source: TensorSource, groups: dict[str, dict[str, str]], kind: Kind, family: str,
                 resolve: Callable[[str, tuple[int, int] | None], Target | None], *,
                 unrecognised: list[str] | None = None, certain: bool = True) -> AdapterIndex:
    """Entries for a file's modules (``groups``: module name → factor → tensor name), resolved by ``resolve``.

    Keys that name no module are one error naming them; so is a module that lacks a factor.
    ``certain``: the file's names say its family (then architecture detection is told so).
    """
    unrecognised = list(unrecognised or [])
    alphas = source.scalars([parts["alpha"] for parts in groups.values() if "alpha" in parts])
    entries: dict[str, ModuleEntry] = {}
    for name, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            if set(parts) <= {"alpha", "mid"}:
                unrecognised.extend(parts.values())
                continue
            missing = "up" if "down" in parts else "down"
            raise CorruptFileError(f"{source.path.name}: module {name} has no {missing} factor", "The file is incomplete")
        target = resolve(name, stored_shape(source, parts["down"], parts["up"]))
        if target is None:
            unrecognised.extend(parts.values())
            continue
        alpha = alphas[parts["alpha"]] if "alpha" in parts else None
        add_entries(entries, source, fused_entries(target, source, parts["down"], parts["up"], alpha, parts.get("mid"), name))
    refuse_unplaced(source, unrecognised, family)
    hint = family if certain and family != SD else None
    return AdapterIndex(kind, [source], entries, dict(source.metadata), family=hint)


def cross_widths(source: TensorSource, groups: dict[str, dict[str, str]], unet_paths: dict[str, str]) -> list[int]:
    """Input widths of cross-attention k/v modules (SGM paths), which tell SD1/SD2 from SDXL."""
    return [source.shapes[groups[name]["down"]][1] for name, path in unet_paths.items()
            if _CROSS.search(path) and "down" in groups[name]]
