"""XLabs-AI Flux.1 LoRA files (read only): LoRA layers named after XLabs' attention processors.

``double_blocks.N.processor.qkv_lora1`` adapts the image stream's fused ``qkv`` (diffusers'
``to_q``, ``to_k``, ``to_v``), ``proj_lora1`` its output (``attn.to_out.0``); ``qkv_lora2`` and
``proj_lora2`` the text stream (``add_q_proj``…, ``to_add_out``); ``single_blocks.N.processor.qkv_lora``
a single block's q, k and v. Factors are ``.down.weight``/``.up.weight``, with or without the
``diffusion_model.`` prefix; there is no alpha (scale 1), as in diffusers' own reader
(``_convert_xlabs_flux_lora_to_diffusers``). A single block's ``proj_lora`` adapts only the
attention half of ``linear2``'s input, which no diffusers module is: such a file is refused,
naming the key.
"""

from __future__ import annotations

import re

from ..architectures import FLUX_FAMILY
from ..naming import Target
from ..naming.flux import FLUX_MAP
from .base import AdapterIndex, Format, Inputs, Kind
from .original import index_groups

XLABS = Kind("xlabs", "XLabs-AI Flux LoRA (processor.qkv_lora1)", True)
XLABS_KEY = re.compile(r"^((?:diffusion_model\.)?(?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora[12]?)"
                       r"\.(down|up)\.weight$")
_NATIVE = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
           "proj_lora2": "txt_attn.proj"}
_SINGLE_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")


def _target(module: str) -> Target | None:
    match = re.match(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(\w+)$", module)
    if match is None:
        return None
    kind, index, layer = match.groups()
    if kind == "double" and layer in _NATIVE:
        return FLUX_MAP.to_target(f"double_blocks.{index}.{_NATIVE[layer]}")
    if kind == "single" and layer == "qkv_lora":
        return Target(tuple(f"transformer.single_transformer_blocks.{index}.{p}" for p in _SINGLE_QKV), (1, 1, 1))
    return None


def read(inputs: Inputs) -> AdapterIndex:
    """Index an XLabs Flux LoRA file from its header."""
    source = inputs.sources[0]
    groups: dict[str, dict[str, str]] = {}
    unrecognised = []
    for name in source.names:
        if match := XLABS_KEY.match(name):
            groups.setdefault(match.group(1), {})[match.group(2)] = name
        else:
            unrecognised.append(name)
    return index_groups(source, groups, XLABS, FLUX_FAMILY, lambda module, shape: _target(module),
                        unrecognised=unrecognised)


FORMAT = Format("xlabs", "XLabs-AI Flux LoRA (read only)", ((XLABS, XLABS_KEY),), read)
