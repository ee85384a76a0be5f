"""kohya-ss (sd-scripts) module names: ``lora_unet_…``, ``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``.

kohya flattens a module path by replacing every ``.`` with ``_``, which loses the boundary
between path segments that themselves contain ``_`` (``transformer_blocks``, ``to_out``).
Reading a name back therefore parses it against the vocabulary of segment names that the
diffusers, transformers and SGM model classes use; tests check that every module of the
full-size SD1.5, SD2.1 and SDXL models parses back to itself and to nothing else.
"""

from __future__ import annotations

from functools import lru_cache

from ..architectures import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from . import internal_key
from .sgm import UNetLayout, diffusers_to_sgm, is_sgm_path, sgm_to_diffusers

# Segment names of the diffusers UNet, the transformers CLIP text models and the SGM UNet.
SEGMENTS = frozenset({
    # diffusers UNet2DConditionModel
    "add_embedding", "attentions", "attn1", "attn2", "conv", "conv1", "conv2", "conv_in", "conv_norm_out",
    "conv_out", "conv_shortcut", "down_blocks", "downsamplers", "ff", "linear_1", "linear_2", "mid_block",
    "net", "norm", "norm1", "norm2", "norm3", "proj", "proj_in", "proj_out", "resnets", "time_emb_proj",
    "time_embedding", "to_k", "to_out", "to_q", "to_v", "transformer_blocks", "up_blocks", "upsamplers",
    # transformers CLIPTextModel / CLIPTextModelWithProjection
    "text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "mlp",
    "fc1", "fc2", "text_projection", "embeddings", "token_embedding", "position_embedding",
    "final_layer_norm", "layer_norm1", "layer_norm2",
    # Stability SGM UNet
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "op", "time_embed", "label_emb", "out",
})
_LONGEST = max(s.count("_") + 1 for s in SEGMENTS)

PREFIX_COMPONENT = {"lora_unet": UNET, "lora_te": TEXT_ENCODER, "lora_te1": TEXT_ENCODER, "lora_te2": TEXT_ENCODER_2}


@lru_cache(maxsize=65536)
def unflatten(flat: str) -> str | None:
    """Turn ``down_blocks_0_attentions_0_proj_in`` back into ``down_blocks.0.attentions.0.proj_in``.

    Returns None when the name cannot be split into known segments and indices.
    """
    if not flat:
        return None
    parts = flat.split("_")
    # parsed[i]: the segments of parts[i:], preferring the longest segment first (None: no parse).
    parsed: list[list[str] | None] = [None] * len(parts) + [[]]
    for start in range(len(parts) - 1, -1, -1):
        for stop in range(min(len(parts), start + _LONGEST), start, -1):
            token = "_".join(parts[start:stop])
            if (token.isdigit() or token in SEGMENTS) and parsed[stop] is not None:
                parsed[start] = [token, *parsed[stop]]
                break
    return ".".join(parsed[0]) if parsed[0] else None


def split_prefix(name: str) -> tuple[str, str] | None:
    """Split ``lora_te2_text_model_…`` into (``text_encoder_2``, ``text_model_…``)."""
    for prefix in ("lora_unet", "lora_te1", "lora_te2", "lora_te"):
        if name.startswith(prefix + "_"):
            return PREFIX_COMPONENT[prefix], name[len(prefix) + 1:]
    return None


def parse_module_name(name: str, layout: UNetLayout) -> str | None:
    """The internal key (``unet.down_blocks.0…``) of a kohya module name, or None if unrecognised.

    ``layout`` decides how SGM block names (``input_blocks_4_1_…``) map to diffusers paths.
    """
    split = split_prefix(name)
    if split is None:
        return None
    component, flat = split
    path = unflatten(flat)
    if path is None:
        return None
    if component == UNET and is_sgm_path(path):
        path = sgm_to_diffusers(path, layout)
    return None if path is None else internal_key(component, path)


def module_name(key: str, *, sgm_layout: UNetLayout | None, two_text_encoders: bool) -> str:
    """The kohya module name of an internal key.

    UNet paths use SGM block names when ``sgm_layout`` is given (SDXL, as sd-scripts writes);
    text encoders are ``lora_te1``/``lora_te2`` when the model has two, else ``lora_te``.
    """
    component, path = key.split(".", 1)
    if component == UNET:
        prefix = "lora_unet"
        if sgm_layout is not None:
            sgm = diffusers_to_sgm(path, sgm_layout)
            if sgm is None:
                raise ValueError(f"{key} has no SGM name")
            path = sgm
    elif component == TEXT_ENCODER:
        prefix = "lora_te1" if two_text_encoders else "lora_te"
    elif component == TEXT_ENCODER_2:
        prefix = "lora_te2"
    else:
        raise ValueError(f"unknown component in {key}")
    return f"{prefix}_{path.replace('.', '_')}"
