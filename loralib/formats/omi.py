"""OMI LoRA files (open model interchange; InvokeAI reads them, OneTrainer writes them). Read only.

Each component under a short prefix, the denoiser in the original model's names:

- SD1.x/SD2.x/SDXL: ``unet.<SGM path>`` (``unet.input_blocks.4.1.proj_in.lora_down.weight``),
  text encoders ``clip_l.text_model.…`` and ``clip_g.text_model.…``;
- Flux.1 and SD3: ``transformer.<BFL or MMDiT path>`` with each part of a fused layer as its own
  module (``transformer.double_blocks.0.img_attn.qkv.1`` is ``to_k``; the image embedder is
  ``img_in.proj``), text encoders ``clip_l.…``, ``clip_g.…`` and ``t5.encoder.block.…``;
- factors ``lora_down.weight``/``lora_up.weight`` with an optional ``alpha`` (kohya convention).
"""

from __future__ import annotations

import re

from ..architectures import FLUX_FAMILY, SD, SD3_FAMILY, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3
from ..naming import Target, internal_key, is_t5_path
from ..naming.flux import ROOTS as BFL_ROOTS
from ..naming.sd3 import ROOTS as MMDIT_ROOTS
from ..naming.sgm import SGM_ROOTS
from .base import AdapterIndex, Format, Inputs, Kind
from .diffusers import TEXT_ROOTS
from .original import FACTOR_SUFFIX, FACTORS, cross_widths, index_groups, native_target, path_family, sgm_layout

OMI = Kind("omi", "OMI LoRA (unet./transformer., clip_l., t5.)", True)


def _alternatives(roots) -> str:
    return "|".join(re.escape(r) for r in roots)


OMI_KEY = re.compile(rf"^((?:unet\.(?:{_alternatives(SGM_ROOTS)})|transformer\.(?:{_alternatives((*BFL_ROOTS, *MMDIT_ROOTS))})|"
                     rf"(?:clip_l|clip_g|clip_h|t5)\.(?:{_alternatives(TEXT_ROOTS)}))(?:\.\w+)*?)\.{FACTOR_SUFFIX}$")
_TEXT = {"clip_l": TEXT_ENCODER, "clip_h": TEXT_ENCODER, "clip_g": TEXT_ENCODER_2}


def read(inputs: Inputs) -> AdapterIndex:
    """Index an OMI LoRA file from its header."""
    source = inputs.sources[0]
    groups: dict[str, dict[str, str]] = {}
    unrecognised = []
    for name in source.names:
        if match := OMI_KEY.match(name):
            groups.setdefault(match.group(1), {})[FACTORS[match.group(2)]] = name
        else:
            unrecognised.append(name)
    split = {m: m.split(".", 1) for m in groups}
    denoiser = {m: path.replace("img_in.proj", "img_in") if path.startswith("img_in.proj") else path
                for m, (prefix, path) in split.items() if prefix in ("unet", "transformer")}
    prefixes = {prefix for prefix, _ in split.values()}
    hint = SD3_FAMILY if {"clip_g", "t5"} <= prefixes else FLUX_FAMILY if "t5" in prefixes else None
    family, certain = path_family(denoiser.values(), hint, source.metadata)
    layout = sgm_layout(cross_widths(source, groups, denoiser)) if family == SD else None

    def resolve(module: str, shape: tuple[int, int] | None) -> Target | None:
        prefix, path = split[module]
        if module in denoiser:
            if (prefix == "unet") != (family == SD):
                return None
            return native_target(family, denoiser[module], shape, layout, split_parts=True)
        component = (TEXT_ENCODER_3 if family == SD3_FAMILY else TEXT_ENCODER_2) if prefix == "t5" else _TEXT[prefix]
        if is_t5_path(path) != (prefix == "t5"):
            return None
        return Target((internal_key(component, path),))

    return index_groups(source, groups, OMI, family, resolve, unrecognised=unrecognised, certain=certain)


FORMAT = Format("omi", "OMI LoRA (read only)", ((OMI, OMI_KEY),), read)
