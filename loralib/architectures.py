"""The base-model architectures lorareg knows, and how to tell them apart from an adapter's keys.

An adapter's architecture is decided by its tensors, never by its metadata (files lie: a Flux
LoRA in the fixtures claims ``sd_1.5``). The evidence is the width of cross-attention inputs
(768 for SD1.x, 1024 for SD2.x, 2048 for SDXL), the text-encoder width, and structure that only
one family has (SDXL's second text encoder, its attention-free first down block and deep
transformer stacks).

The full-size configs below are the published ``config.json`` files of the reference models;
tests instantiate them on the ``meta`` device to check every module name lorareg maps.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)

SD15_UNET_CONFIG: dict = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D", "DownBlock2D"], "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET_CONFIG: dict = {
    **SD15_UNET_CONFIG, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "sample_size": 96, "use_linear_projection": True, "upcast_attention": True,
}
SDXL_UNET_CONFIG: dict = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
CLIP_L_CONFIG: dict = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}
OPENCLIP_H_CONFIG: dict = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                           "num_attention_heads": 16, "projection_dim": 512, "hidden_act": "gelu"}
OPENCLIP_BIGG_CONFIG: dict = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                              "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}


@dataclass(frozen=True)
class Architecture:
    """A base-model family and the conventions its adapters follow."""

    name: str
    title: str
    ss_base_model_version: str
    modelspec_architecture: str
    modelspec_implementation: str
    resolution: int
    unet_config: Mapping = field(repr=False)
    text_encoders: Mapping[str, Mapping] = field(repr=False)
    uses_sgm_names: bool = False  # kohya names this family's UNet modules with Stability's SGM block names


SD1 = Architecture("sd1", "Stable Diffusion 1.x", "sd_v1", "stable-diffusion-v1/lora", "diffusers", 512,
                   SD15_UNET_CONFIG, {TEXT_ENCODER: CLIP_L_CONFIG})
SD2 = Architecture("sd2", "Stable Diffusion 2.x", "sd_v2", "stable-diffusion-v2-768-v/lora", "diffusers", 768,
                   SD21_UNET_CONFIG, {TEXT_ENCODER: OPENCLIP_H_CONFIG})
SDXL = Architecture("sdxl", "Stable Diffusion XL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora",
                    "https://github.com/Stability-AI/generative-models", 1024, SDXL_UNET_CONFIG,
                    {TEXT_ENCODER: CLIP_L_CONFIG, TEXT_ENCODER_2: OPENCLIP_BIGG_CONFIG}, uses_sgm_names=True)
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (SD1, SD2, SDXL)}

# Families lorareg recognises and names but whose adapters it does not convert.
FOREIGN_FAMILIES = {"flux": "Flux.1", "sd3": "Stable Diffusion 3"}
UNKNOWN = "unknown"

_CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TEXT_ENCODER_WIDTH = {768: "sd1", 1024: "sd2"}
_CROSS_KEY = re.compile(r"^unet\..*\.attn2\.(to_k|to_v)$")
_TE_KEY = re.compile(r"^text_encoder\..*\.(q_proj|k_proj|v_proj|fc1)$")


@dataclass(frozen=True)
class Detection:
    """An architecture decision and the evidence it rests on."""

    name: str
    evidence: str


_DEEP_STACK = re.compile(r"^unet\.(down_blocks\.[12]\.attentions\.\d+|mid_block\.attentions\.0)\.transformer_blocks\.[2-9]\.")


def detect_architecture(in_features: Mapping[str, int]) -> Detection:
    """Decide the base architecture from module keys and their input widths.

    ``in_features`` maps each adapted module's key (``unet.…``, ``text_encoder.…``) to the
    number of input features of its ``down`` factor.
    """
    if any(key.startswith(TEXT_ENCODER_2 + ".") for key in in_features):
        return Detection("sdxl", "it adapts a second text encoder (only SDXL has one)")
    cross = Counter(w for key, w in in_features.items() if _CROSS_KEY.match(key))
    if cross:
        width = cross.most_common(1)[0][0]
        if width in _CROSS_ATTENTION_WIDTH:
            return Detection(_CROSS_ATTENTION_WIDTH[width], f"cross-attention input width is {width}")
    if any(map(_DEEP_STACK.match, in_features)):
        return Detection("sdxl", "its UNet has transformer stacks deeper than two blocks (only SDXL has them)")
    te = Counter(w for key, w in in_features.items() if _TE_KEY.match(key) and not key.endswith("fc2"))
    if te:
        width = te.most_common(1)[0][0]
        if width in _TEXT_ENCODER_WIDTH:
            return Detection(_TEXT_ENCODER_WIDTH[width], f"text-encoder width is {width}")
    return Detection(UNKNOWN, "no module has a width that identifies SD1.x, SD2.x or SDXL")
