"""OneTrainer's spellings that no other reader covers (read only).

OneTrainer saves a LoRA in one of four spellings: COMFY (read by :mod:`~loralib.formats.comfyui`),
LEGACY (kohya-style flattened diffusers names, ``lora_unet_down_blocks_…``, ``lora_transformer_…``,
read by :mod:`~loralib.formats.kohya`), and the two read here:

- INTERNAL: its own module names, a component prefix and the diffusers/transformers module
  path with kohya factors — ``lora_unet.down_blocks.0.attentions.0.proj_in.lora_down.weight``,
  ``lora_te1.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight``,
  ``lora_transformer.transformer_blocks.0.attn.to_q.alpha`` (also with the pipeline component
  as prefix: ``text_encoder.text_model.….lora_down.weight``);
- ORIGINAL: the original checkpoint's module paths without prefix and with PEFT factors —
  ``input_blocks.4.1.proj_in.lora_A.weight`` (SDXL), ``double_blocks.0.img_attn.qkv.lora_A.weight``
  (Flux.1, fused layers split on reading).

Component prefixes follow OneTrainer's numbering: ``lora_te2`` is CLIP-G for SDXL and SD3 but T5
for Flux.1; ``lora_te3`` is SD3's T5.
"""

from __future__ import annotations

import re

from ..architectures import (
    FLUX_FAMILY,
    SD,
    SD3_FAMILY,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ENCODER_3,
    TRANSFORMER,
    UNET,
    claimed_architecture,
    family_of,
)
from ..naming import Target, internal_key, is_t5_path
from .base import AdapterIndex, Format, Inputs, Kind
from .diffusers import TEXT_ROOTS, TRANSFORMER_ROOTS, UNET_ROOTS, fits
from .original import (
    FACTOR_SUFFIX,
    FACTORS,
    NATIVE_ROOTS,
    cross_widths,
    index_groups,
    native_target,
    path_family,
    sgm_layout,
)
from .source import TensorSource

INTERNAL = Kind("onetrainer-internal", "OneTrainer LoRA (INTERNAL spelling)", True)
ORIGINAL = Kind("onetrainer-original", "OneTrainer LoRA (ORIGINAL spelling: original module names)", True)
_PREFIXES = ("lora_unet", "lora_transformer", "lora_te1", "lora_te2", "lora_te3", "lora_te", "unet", "transformer",
             "text_encoder_2", "text_encoder_3", "text_encoder")
_DIFFUSERS_ROOTS = "|".join(re.escape(r) for r in (*UNET_ROOTS, *TRANSFORMER_ROOTS, *TEXT_ROOTS))
INTERNAL_KEY = re.compile(rf"^((?:{'|'.join(_PREFIXES)})\.(?:{_DIFFUSERS_ROOTS})(?:\.\w+)*?)"
                          r"\.(lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha)$")
ORIGINAL_KEY = re.compile(rf"^((?:{'|'.join(re.escape(r) for r in NATIVE_ROOTS)})(?:\.\w+)*?)\.{FACTOR_SUFFIX}$")
_COMPONENTS = {"lora_unet": UNET, "unet": UNET, "lora_transformer": TRANSFORMER, "transformer": TRANSFORMER,
               "lora_te": TEXT_ENCODER, "lora_te1": TEXT_ENCODER, "text_encoder": TEXT_ENCODER,
               "lora_te2": TEXT_ENCODER_2, "text_encoder_2": TEXT_ENCODER_2,
               "lora_te3": TEXT_ENCODER_3, "text_encoder_3": TEXT_ENCODER_3}


def _groups(source: TensorSource, pattern: re.Pattern[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    groups: dict[str, dict[str, str]] = {}
    unrecognised = []
    for name in source.names:
        if match := pattern.match(name):
            groups.setdefault(match.group(1), {})[FACTORS[match.group(2)]] = name
        else:
            unrecognised.append(name)
    return groups, unrecognised


def read_internal(inputs: Inputs) -> AdapterIndex:
    """Index a file in OneTrainer's INTERNAL spelling."""
    source = inputs.sources[0]
    groups, unrecognised = _groups(source, INTERNAL_KEY)
    split = {m: m.split(".", 1) for m in groups}
    family, certain = _internal_family(split.values(), source.metadata)

    def resolve(module: str, shape: tuple[int, int] | None) -> Target | None:
        prefix, path = split[module]
        component = _COMPONENTS[prefix]
        if component == TEXT_ENCODER_3 and family == FLUX_FAMILY:
            component = TEXT_ENCODER_2  # Flux's T5, numbered as kohya numbers it
        if not fits(component, path) or (component not in (UNET, TRANSFORMER) and
                                         is_t5_path(path) != _is_t5_slot(component, family)):
            return None
        return Target((internal_key(component, path),))

    return index_groups(source, groups, INTERNAL, family, resolve, unrecognised=unrecognised, certain=certain)


def _is_t5_slot(component: str, family: str) -> bool:
    return (family == FLUX_FAMILY and component == TEXT_ENCODER_2) or component == TEXT_ENCODER_3


def _internal_family(pairs, metadata: dict[str, str]) -> tuple[str, bool]:
    """The family of an INTERNAL file and whether its names say so (else the metadata or a default does).

    Only the text encoders' numbering depends on it: transformer paths are diffusers' in every family.
    """
    pairs = list(pairs)
    components = {_COMPONENTS[prefix] for prefix, _ in pairs}
    transformer = [path for prefix, path in pairs if _COMPONENTS[prefix] == TRANSFORMER]
    te2 = [path for prefix, path in pairs if _COMPONENTS[prefix] == TEXT_ENCODER_2]
    if any(p.startswith("single_transformer_blocks") for p in transformer) or any(is_t5_path(p) for p in te2):
        return FLUX_FAMILY, True
    if TEXT_ENCODER_3 in components or any(".attn2." in p for p in transformer):
        return SD3_FAMILY, True
    if not transformer:
        return SD, True
    claim = family_of(claimed_architecture(metadata) or "")
    return (claim if claim in (FLUX_FAMILY, SD3_FAMILY) else FLUX_FAMILY), False


def read_original(inputs: Inputs) -> AdapterIndex:
    """Index a file in OneTrainer's ORIGINAL spelling (original module paths, no prefix)."""
    source = inputs.sources[0]
    groups, unrecognised = _groups(source, ORIGINAL_KEY)
    family, certain = path_family(groups, None, source.metadata)
    layout = sgm_layout(cross_widths(source, groups, {m: m for m in groups})) if family == SD else None
    return index_groups(source, groups, ORIGINAL, family,
                        lambda module, shape: native_target(family, module, shape, layout),
                        unrecognised=unrecognised, certain=certain)


INTERNAL_FORMAT = Format("onetrainer-internal", "OneTrainer INTERNAL spelling (read only)", ((INTERNAL, INTERNAL_KEY),),
                         read_internal)
ORIGINAL_FORMAT = Format("onetrainer-original", "OneTrainer ORIGINAL spelling (read only)", ((ORIGINAL, ORIGINAL_KEY),),
                         read_original)
