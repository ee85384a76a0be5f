"""kohya-ss (sd-scripts) module names: ``lora_unet_…``, ``lora_transformer_…``, ``lora_te[123]_…``.

kohya flattens a module path by replacing every ``.`` with ``_``, which loses the boundary
between path segments that themselves contain ``_`` (``transformer_blocks``, ``to_out``).
Reading a name back therefore parses it against the vocabulary of segment names of the model
classes the family uses. This module is the one resolver of kohya-style names for every family:

- ``sd`` (SD1.x/SD2.x/SDXL): ``lora_unet_`` + a diffusers UNet path or an SGM path (SDXL, as
  sd-scripts writes it), ``lora_te_``/``lora_te1_``/``lora_te2_`` + a CLIP path.
- ``flux``: ``lora_unet_`` + a BFL path (``double_blocks_0_img_attn_qkv``, fused layers
  included), ``lora_transformer_`` + a diffusers path (OneTrainer), ``lora_te1_`` (CLIP-L) and
  ``lora_te3_`` (T5, as sd-scripts writes it; OneTrainer writes ``lora_te2_``).
- ``sd3``: ``lora_unet_`` + an MMDiT path (``joint_blocks_0_x_block_attn_qkv``),
  ``lora_transformer_`` + a diffusers path, ``lora_te1_`` (CLIP-L), ``lora_te2_`` (CLIP-G),
  ``lora_te3_`` (T5).

A name resolves to a :class:`~loralib.naming.Target`: the internal key(s) it stands for, with
the row layout of a fused layer. Tests check that every module of the full-size models of every
architecture has one name that resolves back to itself and to nothing else.
"""

from __future__ import annotations

from functools import lru_cache

from ..architectures import (
    FLUX_FAMILY,
    SD,
    SD3_FAMILY,
    SDXL,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ENCODER_3,
    TRANSFORMER,
    UNET,
)
from . import Target, internal_key, is_t5_path
from .flux import FLUX_MAP
from .native import NativeMap
from .sd3 import SD3_MAP
from .sgm import UNetLayout, diffusers_to_sgm, is_sgm_path, sgm_to_diffusers

# transformers CLIPTextModel / CLIPTextModelWithProjection and T5EncoderModel
CLIP_SEGMENTS = frozenset({
    "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "mlp",
    "fc1", "fc2", "text_projection", "embeddings", "token_embedding", "position_embedding",
    "final_layer_norm", "layer_norm1", "layer_norm2",
})
T5_SEGMENTS = frozenset({
    "encoder", "block", "layer", "SelfAttention", "q", "k", "v", "o", "DenseReluDense", "wi", "wi_0", "wi_1", "wo",
    "final_layer_norm", "layer_norm", "relative_attention_bias", "shared", "embed_tokens",
})
# Segment names of the diffusers UNet, the CLIP text models and the SGM UNet.
SEGMENTS = frozenset({
    # diffusers UNet2DConditionModel
    "add_embedding", "attentions", "attn1", "attn2", "conv", "conv1", "conv2", "conv_in", "conv_norm_out",
    "conv_out", "conv_shortcut", "down_blocks", "downsamplers", "ff", "linear_1", "linear_2", "mid_block",
    "net", "norm", "norm1", "norm2", "norm3", "proj", "proj_in", "proj_out", "resnets", "time_emb_proj",
    "time_embedding", "to_k", "to_out", "to_q", "to_v", "transformer_blocks", "up_blocks", "upsamplers",
    # Stability SGM UNet
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "op", "time_embed", "label_emb", "out",
}) | CLIP_SEGMENTS
# diffusers FluxTransformer2DModel and SD3Transformer2DModel
DIT_SEGMENTS = frozenset({
    "transformer_blocks", "single_transformer_blocks", "attn", "attn2", "to_q", "to_k", "to_v", "to_out",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff", "ff_context", "net", "proj", "norm1",
    "norm1_context", "norm", "linear", "proj_mlp", "proj_out", "x_embedder", "context_embedder", "time_text_embed",
    "timestep_embedder", "text_embedder", "guidance_embedder", "linear_1", "linear_2", "norm_out", "pos_embed",
})
# Black Forest Labs' Flux.1 (BFL) and Stability's MMDiT (SD3)
BFL_SEGMENTS = frozenset({
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "qkv", "proj", "img_mlp", "txt_mlp", "img_mod",
    "txt_mod", "lin", "linear1", "linear2", "modulation", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
    "in_layer", "out_layer", "final_layer", "adaLN_modulation", "linear",
})
MMDIT_SEGMENTS = frozenset({
    "joint_blocks", "x_block", "context_block", "attn", "attn2", "qkv", "proj", "mlp", "fc1", "fc2",
    "adaLN_modulation", "x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer", "linear",
})
TEXT_SEGMENTS = CLIP_SEGMENTS | T5_SEGMENTS

PREFIX_COMPONENT = {"lora_unet": UNET, "lora_te": TEXT_ENCODER, "lora_te1": TEXT_ENCODER, "lora_te2": TEXT_ENCODER_2}
PREFIXES = ("lora_unet", "lora_transformer", "lora_te1", "lora_te2", "lora_te3", "lora_te")
_NATIVE_MAPS: dict[str, NativeMap] = {FLUX_FAMILY: FLUX_MAP, SD3_FAMILY: SD3_MAP}
_NATIVE_SEGMENTS = {FLUX_FAMILY: BFL_SEGMENTS, SD3_FAMILY: MMDIT_SEGMENTS}
# Which text encoder each prefix names, and whether it is a T5 (the rest are CLIP).
_TEXT_PREFIXES: dict[str, dict[str, tuple[str, bool]]] = {
    SD: {"lora_te": (TEXT_ENCODER, False), "lora_te1": (TEXT_ENCODER, False), "lora_te2": (TEXT_ENCODER_2, False)},
    FLUX_FAMILY: {"lora_te": (TEXT_ENCODER, False), "lora_te1": (TEXT_ENCODER, False),
                  "lora_te2": (TEXT_ENCODER_2, True), "lora_te3": (TEXT_ENCODER_2, True)},
    SD3_FAMILY: {"lora_te": (TEXT_ENCODER, False), "lora_te1": (TEXT_ENCODER, False),
                 "lora_te2": (TEXT_ENCODER_2, False), "lora_te3": (TEXT_ENCODER_3, True)},
}
# The prefix each family's writers use for a text encoder.
_WRITTEN_TEXT_PREFIX = {FLUX_FAMILY: {TEXT_ENCODER: "lora_te1", TEXT_ENCODER_2: "lora_te3"},
                        SD3_FAMILY: {TEXT_ENCODER: "lora_te1", TEXT_ENCODER_2: "lora_te2", TEXT_ENCODER_3: "lora_te3"}}


def _longest(segments: frozenset[str]) -> int:
    return max(s.count("_") + 1 for s in segments)


@lru_cache(maxsize=65536)
def unflatten(flat: str, segments: frozenset[str] = SEGMENTS) -> str | None:
    """Turn ``down_blocks_0_attentions_0_proj_in`` back into ``down_blocks.0.attentions.0.proj_in``.

    ``segments`` is the vocabulary of segment names (default: the SD UNet, SGM and CLIP).
    Returns None when the name cannot be split into known segments and indices.
    """
    if not flat:
        return None
    parts = flat.split("_")
    longest = _longest(segments)
    # parsed[i]: the segments of parts[i:], preferring the longest segment first (None: no parse).
    parsed: list[list[str] | None] = [None] * len(parts) + [[]]
    for start in range(len(parts) - 1, -1, -1):
        for stop in range(min(len(parts), start + longest), start, -1):
            token = "_".join(parts[start:stop])
            if (token.isdigit() or token in segments) and parsed[stop] is not None:
                parsed[start] = [token, *parsed[stop]]
                break
    return ".".join(parsed[0]) if parsed[0] else None


def _split(name: str) -> tuple[str, str] | None:
    for prefix in PREFIXES:
        if name.startswith(prefix + "_"):
            return prefix, name[len(prefix) + 1:]
    return None


def split_prefix(name: str) -> tuple[str, str] | None:
    """Split an SD name ``lora_te2_text_model_…`` into (``text_encoder_2``, ``text_model_…``)."""
    split = _split(name)
    if split is None or split[0] not in PREFIX_COMPONENT:
        return None
    return PREFIX_COMPONENT[split[0]], split[1]


def family_of_names(names: list[str]) -> str | None:
    """The family whose vocabulary kohya-style module names use: ``flux`` for BFL block names,
    ``sd3`` for MMDiT ones, None when the names alone do not say (SD names, text encoders only)."""
    for name in names:
        split = _split(name)
        if split is None:
            continue
        prefix, flat = split
        if prefix == "lora_unet":
            if flat.startswith(("double_blocks_", "single_blocks_", "img_in", "txt_in", "time_in_", "vector_in_",
                                "guidance_in_")):
                return FLUX_FAMILY
            if flat.startswith(("joint_blocks_", "x_embedder_", "t_embedder_", "y_embedder_")):
                return SD3_FAMILY
        elif prefix == "lora_transformer" and flat.startswith("single_transformer_blocks_"):
            return FLUX_FAMILY
    return None


def _resolve(name: str, layout: UNetLayout | None, family: str, shape: tuple[int, int] | None
             ) -> tuple[Target, bool] | None:
    """The target of a name and whether its row order depends on a shape that was not given."""
    split = _split(name)
    if split is None:
        return None
    prefix, flat = split
    if prefix.startswith("lora_te"):
        known = _TEXT_PREFIXES[family].get(prefix)
        path = unflatten(flat, TEXT_SEGMENTS)
        if known is None or path is None:
            return None
        component, t5 = known
        if is_t5_path(path) != t5:
            return None
        return Target((internal_key(component, path),)), False
    if family == SD:
        if prefix != "lora_unet":
            return None
        path = unflatten(flat, SEGMENTS)
        if path is not None and is_sgm_path(path):
            path = sgm_to_diffusers(path, layout or UNetLayout.from_config(SDXL.unet_config))
        return (Target((f"{UNET}.{path}",)), False) if path is not None else None
    if prefix == "lora_transformer":
        path = unflatten(flat, DIT_SEGMENTS)
        return (Target((f"{TRANSFORMER}.{path}",)), False) if path is not None else None
    native = unflatten(flat, _NATIVE_SEGMENTS[family])
    if native is None:
        return None
    native_map = _NATIVE_MAPS[family]
    target = native_map.to_target(native, shape)
    if target is None:
        return None
    return target, shape is None and native_map.is_conditional(native)


def resolve_module_name(name: str, layout: UNetLayout | None = None, *, family: str | None = None,
                        shape: tuple[int, int] | None = None) -> Target | None:
    """What a kohya-style module name stands for in ``family`` (``sd``, ``flux``, ``sd3``; default ``sd``).

    ``layout`` decides how SD's SGM block names (``input_blocks_4_1_…``) map to diffusers paths
    (default: SDXL's). ``shape`` (``out, in`` of the stored layer) settles row orders that depend on
    it (SD3's last context block). Returns None when the name names nothing of that family.
    """
    resolved = _resolve(name, layout, family or SD, shape)
    return resolved[0] if resolved is not None else None


def parse_module_name(name: str, layout: UNetLayout | None = None, *, family: str | None = None) -> str | None:
    """The internal key (``unet.down_blocks.0…``) of a kohya module name, or None if unrecognised.

    ``layout`` decides how SGM block names (``input_blocks_4_1_…``) map to diffusers paths. Names
    that stand for several modules (a fused ``qkv``) or for rows stored in another order resolve
    only through :func:`resolve_module_name`; here they give None.
    """
    resolved = _resolve(name, layout, family or SD, None)
    if resolved is None or resolved[1]:
        return None
    return resolved[0].key


def module_name(key: str, *, sgm_layout: UNetLayout | None = None, two_text_encoders: bool = False,
                family: str | None = None, with_part: bool = False) -> str | tuple[str, int]:
    """The kohya module name of an internal key (with ``with_part``, also its part index in a fused layer).

    SD: UNet paths use SGM block names when ``sgm_layout`` is given (SDXL, as sd-scripts writes);
    text encoders are ``lora_te1``/``lora_te2`` when the model has two, else ``lora_te``. Flux and
    SD3: the transformer's modules under their original (BFL, MMDiT) names — parts of a fused
    layer share its name — and the text encoders as sd-scripts numbers them.
    """
    component, path = key.split(".", 1)
    family = family or SD
    part = 0
    if component == UNET and family == SD:
        prefix = "lora_unet"
        if sgm_layout is not None:
            sgm = diffusers_to_sgm(path, sgm_layout)
            if sgm is None:
                raise ValueError(f"{key} has no SGM name")
            path = sgm
    elif component == TRANSFORMER and family in _NATIVE_MAPS:
        found = _NATIVE_MAPS[family].to_native(path)
        if found is None:
            raise ValueError(f"{key} has no {family} name")
        prefix, (path, part, _) = "lora_unet", found
    elif family == SD and component == TEXT_ENCODER:
        prefix = "lora_te1" if two_text_encoders else "lora_te"
    elif family == SD and component == TEXT_ENCODER_2:
        prefix = "lora_te2"
    elif family in _WRITTEN_TEXT_PREFIX and component in _WRITTEN_TEXT_PREFIX[family]:
        prefix = _WRITTEN_TEXT_PREFIX[family][component]
    else:
        raise ValueError(f"no kohya name for {key} in the {family} family")
    name = f"{prefix}_{path.replace('.', '_')}"
    return (name, part) if with_part else name
