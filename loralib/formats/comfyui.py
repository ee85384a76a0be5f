"""ComfyUI / BFL LoRA files: the original models' module names behind ComfyUI's own prefixes.

What ComfyUI's Save LoRA and Train LoRA nodes and OneTrainer's COMFY output write, and what
ai-toolkit writes for Flux with PEFT suffixes:

- denoiser: ``diffusion_model.<original path>`` — SGM paths for SD1.x/SD2.x/SDXL
  (``diffusion_model.input_blocks.4.1.proj_in``), BFL paths for Flux.1
  (``diffusion_model.double_blocks.0.img_attn.qkv``), MMDiT paths for SD3
  (``diffusion_model.joint_blocks.0.x_block.attn.qkv``);
- text encoders: ``text_encoders.<clip_l|clip_h|clip_g|t5xxl>.transformer.<transformers path>``;
- factors ``lora_down.weight``/``lora_up.weight`` (or ``lora_A.weight``/``lora_B.weight``) with an
  optional scalar ``alpha`` (kohya convention).

ComfyUI maps every such key to its model's weight directly (``model_lora_keys_unet`` /
``model_lora_keys_clip`` in ComfyUI's ``comfy/lora.py``). Written with kohya suffixes and alpha,
fused layers as the original model fuses them; diffusers' Flux loader reads this spelling too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..architectures import (
    ARCHITECTURES,
    FLUX_FAMILY,
    SD,
    SD3_FAMILY,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ENCODER_3,
    TRANSFORMER,
    UNET,
)
from ..naming import Target, internal_key, is_t5_path
from ..naming.sgm import UNetLayout, diffusers_to_sgm
from .base import AdapterIndex, Format, Inputs, Kind, SaveResult, WriteRequest
from .kohya import adapter_family, alpha_tensor
from .original import FACTOR_SUFFIX, FACTORS, cross_widths, index_groups, native_target, path_family, sgm_layout
from .source import TensorSource
from .writing import write_single_file

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter

COMFYUI = Kind("comfyui", "ComfyUI / BFL LoRA (diffusion_model.…)", True)
DENOISER_PREFIX = "diffusion_model."
TEXT_PREFIX = "text_encoders."
COMFYUI_KEY = re.compile(rf"^((?:diffusion_model|text_encoders\.(?:clip_l|clip_h|clip_g|t5xxl)\.transformer)\.[\w.]+?)"
                         rf"\.{FACTOR_SUFFIX}$")
# ComfyUI's names of each family's text encoders, by pipeline component.
TEXT_NAMES = {SD: {TEXT_ENCODER: "clip_l", TEXT_ENCODER_2: "clip_g"},
              FLUX_FAMILY: {TEXT_ENCODER: "clip_l", TEXT_ENCODER_2: "t5xxl"},
              SD3_FAMILY: {TEXT_ENCODER: "clip_l", TEXT_ENCODER_2: "clip_g", TEXT_ENCODER_3: "t5xxl"}}
# SD2's single text encoder is OpenCLIP-H
_SD2_TEXT = {TEXT_ENCODER: "clip_h"}


def text_component(name: str, family: str) -> str | None:
    """The pipeline component of a ComfyUI text-encoder name in ``family``."""
    return {"clip_l": TEXT_ENCODER, "clip_h": TEXT_ENCODER, "clip_g": TEXT_ENCODER_2,
            "t5xxl": TEXT_ENCODER_3 if family == SD3_FAMILY else TEXT_ENCODER_2}.get(name)


def read(inputs: Inputs) -> AdapterIndex:
    """Index a ComfyUI / BFL LoRA file from its header."""
    return parse(inputs.sources[0])


def parse(source: TensorSource) -> AdapterIndex:
    """Index a ComfyUI / BFL LoRA file from its header."""
    groups: dict[str, dict[str, str]] = {}
    unrecognised = []
    for name in source.names:
        if match := COMFYUI_KEY.match(name):
            groups.setdefault(match.group(1), {})[FACTORS[match.group(2)]] = name
        else:
            unrecognised.append(name)
    denoiser = {m: m[len(DENOISER_PREFIX):] for m in groups if m.startswith(DENOISER_PREFIX)}
    encoders = {m.split(".")[1] for m in groups if m.startswith(TEXT_PREFIX)}
    hint = SD3_FAMILY if {"clip_g", "t5xxl"} <= encoders else FLUX_FAMILY if "t5xxl" in encoders else None
    family, certain = path_family(denoiser.values(), hint, source.metadata)
    layout = sgm_layout(cross_widths(source, groups, denoiser)) if family == SD else None

    def resolve(module: str, shape: tuple[int, int] | None) -> Target | None:
        if module in denoiser:
            return native_target(family, denoiser[module], shape, layout)
        _, encoder, _, path = module.split(".", 3)
        component = text_component(encoder, family)
        if component is None or is_t5_path(path) != (encoder == "t5xxl"):
            return None
        return Target((internal_key(component, path),))

    return index_groups(source, groups, COMFYUI, family, resolve, unrecognised=unrecognised, certain=certain)


def write(adapter: LoraAdapter, path: Path, request: WriteRequest) -> SaveResult:
    """Write ``adapter`` as one ComfyUI / BFL file."""
    tensors = state_dict(adapter, dtype=request.dtype, fused_rank=request.fused_rank)
    return write_single_file(adapter, path, request, COMFYUI.format, tensors)


def state_dict(adapter: LoraAdapter, *, dtype: torch.dtype | None = None,
               fused_rank: int | None = None) -> dict[str, torch.Tensor]:
    """The ComfyUI tensors of an adapter: original denoiser names (fused layers fused), ComfyUI's text-encoder names."""
    from .fusing import native_modules

    family = adapter_family(adapter)
    arch = ARCHITECTURES.get(adapter.architecture)
    texts = _SD2_TEXT if adapter.architecture == "sd2" else TEXT_NAMES[family]
    named: dict[str, object] = {}
    transformer = {k: m for k, m in adapter.modules.items() if k.startswith(TRANSFORMER + ".")}
    if transformer:
        named.update({DENOISER_PREFIX + native: module
                      for native, module in native_modules(transformer, family, rank=fused_rank).items()})
    layout = UNetLayout.from_config(arch.unet_config) if arch is not None and arch.family == SD else None
    for key, module in adapter.modules.items():
        component, path = key.split(".", 1)
        if component == TRANSFORMER:
            continue
        if component == UNET:
            sgm = diffusers_to_sgm(path, layout or _layout_for(adapter))
            if sgm is None:
                raise ValueError(f"{key} has no SGM name")
            named[DENOISER_PREFIX + sgm] = module
        elif component in texts:
            named[f"{TEXT_PREFIX}{texts[component]}.transformer.{path}"] = module
        else:
            raise ValueError(f"no ComfyUI name for {key}")
    tensors = {}
    for name, module in named.items():
        module = module.without_mid()
        if dtype is not None:
            module = module.to(dtype)
        tensors[f"{name}.lora_down.weight"] = module.down
        tensors[f"{name}.lora_up.weight"] = module.up
        tensors[f"{name}.alpha"] = alpha_tensor(module.alpha)
    return tensors


def _layout_for(adapter: LoraAdapter) -> UNetLayout:
    """The SGM layout of an SD adapter whose architecture is unknown: SD1's unless it looks like SDXL."""
    from ..architectures import SD1, SDXL

    config = SDXL.unet_config if TEXT_ENCODER_2 in adapter.components else SD1.unet_config
    return UNetLayout.from_config(config)


FORMAT = Format("comfyui", "ComfyUI / BFL LoRA (diffusion_model., text_encoders.)", ((COMFYUI, COMFYUI_KEY),),
                read, write)
