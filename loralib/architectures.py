"""The base-model architectures lorareg knows, and how to tell them apart from an adapter's keys.

An architecture names its denoiser (``unet`` for SD1.x/SD2.x/SDXL, ``transformer`` for Flux.1
and SD3/SD3.5) with its diffusers class and full-size config, and its text encoders per pipeline
component with their transformers classes and configs:

======== ========================= =============================== ============================
family   denoiser                  ``text_encoder``                ``text_encoder_2`` / ``_3``
======== ========================= =============================== ============================
sd1/sd2  UNet2DConditionModel      CLIP-L / OpenCLIP-H             —
sdxl     UNet2DConditionModel      CLIP-L                          OpenCLIP-bigG
flux     FluxTransformer2DModel    CLIP-L                          T5-XXL
sd3…     SD3Transformer2DModel     CLIP-L (with projection)        CLIP-G; T5-XXL
======== ========================= =============================== ============================

SD3 comes in three shapes that differ in their modules, and each is its own architecture:
``sd3`` (SD3 Medium: 24 joint blocks 1536 wide), ``sd35-medium`` (SD3.5 Medium: the same width,
with a second image-stream attention ``attn2`` in blocks 0–12) and ``sd35-large`` (38 blocks
2432 wide). Flux.1 dev and schnell share every module but the guidance embedder, so ``flux`` is
one architecture (dev's config, schnell's modules are a subset).

An adapter's architecture is decided by its tensors: the width of cross-attention inputs (768
for SD1.x, 1024 for SD2.x, 2048 for SDXL), the width of a transformer's blocks (3072 for Flux,
1536 for SD3/SD3.5 Medium, 2432 for SD3.5 Large) and structure only one family has (SDXL's
second text encoder, Flux's single-stream blocks, SD3.5 Medium's ``attn2``, a T5 encoder in the
second or third slot). Metadata (``ss_base_model_version``, ``modelspec.architecture``) may
break a tie the tensors cannot — SD3 against SD3.5 Medium when no ``attn2`` is adapted, or a
text-encoder-only adapter — but never overrides them: files lie (a Flux LoRA in the fixtures
claims ``sd_1.5``).

The full-size configs below are the published ``config.json`` files of the reference models;
tests instantiate them on the ``meta`` device to check every module name lorareg maps.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

UNET = "unet"
TRANSFORMER = "transformer"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
TEXT_ENCODER_3 = "text_encoder_3"
DENOISERS = (UNET, TRANSFORMER)
TEXT_ENCODERS = (TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3)
COMPONENTS = (UNET, TRANSFORMER, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3)

# Model families: what decides how a file names the denoiser's modules.
SD = "sd"
FLUX_FAMILY = "flux"
SD3_FAMILY = "sd3"
FAMILIES = (SD, FLUX_FAMILY, SD3_FAMILY)

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
# black-forest-labs/FLUX.1-dev transformer/config.json (schnell: guidance_embeds false)
FLUX_TRANSFORMER_CONFIG: dict = {
    "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768,
}
# stabilityai/stable-diffusion-3-medium-diffusers, -3.5-medium and -3.5-large transformer/config.json
SD3_TRANSFORMER_CONFIG: dict = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192, "sample_size": 128,
}
SD35_MEDIUM_TRANSFORMER_CONFIG: dict = {
    **SD3_TRANSFORMER_CONFIG, "dual_attention_layers": list(range(13)), "pos_embed_max_size": 384, "qk_norm": "rms_norm",
}
SD35_LARGE_TRANSFORMER_CONFIG: dict = {
    **SD3_TRANSFORMER_CONFIG, "caption_projection_dim": 2432, "num_attention_heads": 38, "num_layers": 38,
    "qk_norm": "rms_norm",
}
CLIP_L_CONFIG: dict = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}
OPENCLIP_H_CONFIG: dict = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                           "num_attention_heads": 16, "projection_dim": 512, "hidden_act": "gelu"}
OPENCLIP_BIGG_CONFIG: dict = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                              "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}
# google/t5-v1_1-xxl, the encoder of Flux.1 and SD3
T5_XXL_CONFIG: dict = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
                       "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
                       "vocab_size": 32128, "relative_attention_num_buckets": 32, "layer_norm_epsilon": 1e-06}

CLIP = "CLIPTextModel"
CLIP_PROJECTION = "CLIPTextModelWithProjection"
T5 = "T5EncoderModel"


@dataclass(frozen=True)
class Architecture:
    """A base-model family and the conventions its adapters follow.

    ``denoiser`` is the pipeline component that denoises (``unet`` or ``transformer``), built from
    ``denoiser_class`` (a diffusers class name) and ``denoiser_config``; ``text_encoders`` maps
    each text-encoder component to its full-size config and ``text_encoder_classes`` to its
    transformers class name. ``ss_base_model_version`` and the ``modelspec`` values are the ones
    sd-scripts writes for this base.
    """

    name: str
    title: str
    ss_base_model_version: str
    modelspec_architecture: str
    modelspec_implementation: str
    resolution: int
    denoiser_config: Mapping = field(repr=False)
    text_encoders: Mapping[str, Mapping] = field(repr=False)
    uses_sgm_names: bool = False  # kohya names this family's UNet modules with Stability's SGM block names
    family: str = SD
    denoiser: str = UNET
    denoiser_class: str = "UNet2DConditionModel"
    text_encoder_classes: Mapping[str, str] = field(default_factory=dict, repr=False)
    pipeline_class: str = "StableDiffusionPipeline"
    modelspec_variants: tuple[str, ...] = ()  # other modelspec.architecture values an input may keep (a tie)

    @property
    def unet_config(self) -> Mapping:
        """The UNet config (SD1.x/SD2.x/SDXL); for the transformer families, their denoiser config."""
        return self.denoiser_config

    def text_encoder_class(self, component: str) -> str:
        """The transformers class of one text-encoder component."""
        return self.text_encoder_classes.get(component, CLIP_PROJECTION if component == TEXT_ENCODER_2 else CLIP)

    @property
    def components(self) -> tuple[str, ...]:
        """The adaptable components of this architecture, in pipeline order."""
        return (self.denoiser, *self.text_encoders)


SD1 = Architecture("sd1", "Stable Diffusion 1.x", "sd_v1", "stable-diffusion-v1/lora", "diffusers", 512,
                   SD15_UNET_CONFIG, {TEXT_ENCODER: CLIP_L_CONFIG})
SD2 = Architecture("sd2", "Stable Diffusion 2.x", "sd_v2", "stable-diffusion-v2-768-v/lora", "diffusers", 768,
                   SD21_UNET_CONFIG, {TEXT_ENCODER: OPENCLIP_H_CONFIG})
SDXL = Architecture("sdxl", "Stable Diffusion XL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora",
                    "https://github.com/Stability-AI/generative-models", 1024, SDXL_UNET_CONFIG,
                    {TEXT_ENCODER: CLIP_L_CONFIG, TEXT_ENCODER_2: OPENCLIP_BIGG_CONFIG}, uses_sgm_names=True,
                    pipeline_class="StableDiffusionXLPipeline")
# sd-scripts (library/sai_model_spec.py, flux_utils.py, sd3_utils.py): ss_base_model_version "flux1" for
# Flux.1 and the MMDiT model type ("medium", "5-medium", "5-large") for SD3; modelspec.architecture
# "flux-1-dev"/"flux-1-schnell"/"flux-1" and "stable-diffusion-3-<model type>", with "/lora".
FLUX = Architecture("flux", "Flux.1", "flux1", "flux-1/lora", "https://github.com/black-forest-labs/flux", 1024,
                    FLUX_TRANSFORMER_CONFIG, {TEXT_ENCODER: CLIP_L_CONFIG, TEXT_ENCODER_2: T5_XXL_CONFIG},
                    family=FLUX_FAMILY, denoiser=TRANSFORMER, denoiser_class="FluxTransformer2DModel",
                    text_encoder_classes={TEXT_ENCODER: CLIP, TEXT_ENCODER_2: T5}, pipeline_class="FluxPipeline",
                    modelspec_variants=("flux-1-dev/lora", "flux-1-schnell/lora"))
_SD3_ENCODERS = {TEXT_ENCODER: CLIP_L_CONFIG, TEXT_ENCODER_2: OPENCLIP_BIGG_CONFIG, TEXT_ENCODER_3: T5_XXL_CONFIG}
_SD3_CLASSES = {TEXT_ENCODER: CLIP_PROJECTION, TEXT_ENCODER_2: CLIP_PROJECTION, TEXT_ENCODER_3: T5}
SD3 = Architecture("sd3", "Stable Diffusion 3 Medium", "medium", "stable-diffusion-3-medium/lora", "diffusers", 1024,
                   SD3_TRANSFORMER_CONFIG, _SD3_ENCODERS, family=SD3_FAMILY, denoiser=TRANSFORMER,
                   denoiser_class="SD3Transformer2DModel", text_encoder_classes=_SD3_CLASSES,
                   pipeline_class="StableDiffusion3Pipeline")
SD35_MEDIUM = Architecture("sd35-medium", "Stable Diffusion 3.5 Medium", "5-medium", "stable-diffusion-3-5-medium/lora",
                           "diffusers", 1024, SD35_MEDIUM_TRANSFORMER_CONFIG, _SD3_ENCODERS, family=SD3_FAMILY,
                           denoiser=TRANSFORMER, denoiser_class="SD3Transformer2DModel",
                           text_encoder_classes=_SD3_CLASSES, pipeline_class="StableDiffusion3Pipeline")
SD35_LARGE = Architecture("sd35-large", "Stable Diffusion 3.5 Large", "5-large", "stable-diffusion-3-5-large/lora",
                          "diffusers", 1024, SD35_LARGE_TRANSFORMER_CONFIG, _SD3_ENCODERS, family=SD3_FAMILY,
                          denoiser=TRANSFORMER, denoiser_class="SD3Transformer2DModel",
                          text_encoder_classes=_SD3_CLASSES, pipeline_class="StableDiffusion3Pipeline")
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (SD1, SD2, SDXL, FLUX, SD3, SD35_MEDIUM, SD35_LARGE)}
UNKNOWN = "unknown"

_CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TEXT_ENCODER_WIDTH = {768: "sd1", 1024: "sd2"}
_TRANSFORMER_WIDTH = {3072: "flux", 1536: "sd3", 2432: "sd35-large"}
_CROSS_KEY = re.compile(r"^unet\..*\.attn2\.(to_k|to_v)$")
_TE_KEY = re.compile(r"^text_encoder\..*\.(q_proj|k_proj|v_proj|fc1)$")
# Layers whose input is a joint block's hidden width (the block width of an MMDiT).
_BLOCK_INPUT_KEY = re.compile(r"^transformer\.(single_)?transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|add_[qkv]_proj)|"
                              r"norm1(_context)?\.linear|norm\.linear|ff(_context)?\.net\.0\.proj|proj_mlp)$")
_T5_KEY = re.compile(r"^text_encoder_[23]\.encoder\.block\.")
_FLUX_ONLY = re.compile(r"^transformer\.(single_transformer_blocks\.|x_embedder$|time_text_embed\.guidance_embedder\.)")
_SD3_ONLY = re.compile(r"^(transformer\.pos_embed\.|text_encoder_3\.)")


@dataclass(frozen=True)
class Detection:
    """An architecture decision and the evidence it rests on."""

    name: str
    evidence: str


_DEEP_STACK = re.compile(r"^unet\.(down_blocks\.[12]\.attentions\.\d+|mid_block\.attentions\.0)\.transformer_blocks\.[2-9]\.")


def family_of(name: str) -> str | None:
    """The family (``sd``, ``flux``, ``sd3``) of an architecture name, or None if unknown."""
    arch = ARCHITECTURES.get(name)
    return arch.family if arch is not None else None


def claimed_architecture(metadata: Mapping[str, str] | None) -> str | None:
    """The architecture a file's metadata claims (``ss_base_model_version``, ``modelspec.architecture``), if any.

    Only for breaking ties: :func:`detect_architecture` never lets a claim override the tensors.
    """
    if not metadata:
        return None
    text = " ".join(str(metadata.get(k, "")) for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    if not text.strip():
        return None
    rules = (("flux", "flux"), ("3-5-large", "sd35-large"), ("3.5-large", "sd35-large"), ("5-large", "sd35-large"),
             ("3-5-medium", "sd35-medium"), ("3.5-medium", "sd35-medium"), ("5-medium", "sd35-medium"),
             ("stable-diffusion-3", "sd3"), ("sd3", "sd3"), ("xl", "sdxl"))
    for word, name in rules:
        if word in text:
            return name
    if re.search(r"(^|[^0-9])medium($|[^a-z])", text):
        return "sd3"
    if re.search(r"v2|2\.\d|sd_?2", text):
        return "sd2"
    if re.search(r"v1|1\.\d|sd_?1", text):
        return "sd1"
    return None


def detect_architecture(in_features: Mapping[str, int], metadata: Mapping[str, str] | None = None,
                        family: str | None = None) -> Detection:
    """Decide the base architecture from module keys and their input widths.

    ``in_features`` maps each adapted module's key (``unet.…``, ``transformer.…``,
    ``text_encoder.…``) to the number of input features of its ``down`` factor. ``family`` is what
    a reader already knows from the file's own names (``flux`` for BFL block names, ``sd3`` for
    MMDiT ones); ``metadata`` breaks ties the tensors cannot.
    """
    claim = claimed_architecture(metadata)
    if any(key.startswith(TRANSFORMER + ".") for key in in_features) or family in (FLUX_FAMILY, SD3_FAMILY) \
            or any(_T5_KEY.match(k) or _SD3_ONLY.match(k) for k in in_features):
        return _detect_transformer(in_features, claim, family)
    if any(key.startswith(TEXT_ENCODER_2 + ".") for key in in_features):
        if claim in ("sd3", "sd35-medium", "sd35-large"):
            return Detection(claim, f"it adapts CLIP-L and CLIP-G only, which SDXL and SD3 share; the metadata says {claim}")
        return Detection("sdxl", "it adapts a second text encoder (only SDXL has one besides SD3, whose T5 it lacks)")
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
        if width == 768 and claim == "flux" and not any(k.startswith(UNET + ".") for k in in_features):
            return Detection("flux", "it adapts CLIP-L only, which SD1.x and Flux.1 share; the metadata says Flux.1")
        if width in _TEXT_ENCODER_WIDTH:
            return Detection(_TEXT_ENCODER_WIDTH[width], f"text-encoder width is {width}")
    return Detection(UNKNOWN, "no module has a width that identifies SD1.x, SD2.x or SDXL")


def _detect_transformer(in_features: Mapping[str, int], claim: str | None, family: str | None) -> Detection:
    keys = list(in_features)
    if family == FLUX_FAMILY or any(_FLUX_ONLY.match(k) for k in keys) or \
            any(k.startswith(TEXT_ENCODER_2 + ".") and _T5_KEY.match(k) for k in keys):
        why = "its keys name Flux.1 blocks" if family == FLUX_FAMILY else \
            "it has Flux.1's single-stream blocks, image embedder or T5 as second text encoder"
        return Detection("flux", why)
    widths = Counter(w for k, w in in_features.items() if _BLOCK_INPUT_KEY.match(k))
    width = widths.most_common(1)[0][0] if widths else None
    if any(".attn2." in k for k in keys if k.startswith(TRANSFORMER + ".")):
        return Detection("sd35-medium", "its joint blocks have a second image attention (attn2), as only SD3.5 Medium has")
    if width == 3072 and family != SD3_FAMILY:
        return Detection("flux", "its joint blocks are 3072 wide (Flux.1)")
    if width == 2432:
        return Detection("sd35-large", "its joint blocks are 2432 wide (SD3.5 Large)")
    if width == 1536:
        if claim == "sd35-medium":
            return Detection("sd35-medium", "its joint blocks are 1536 wide (SD3 or SD3.5 Medium); the metadata says SD3.5 Medium")
        return Detection("sd3", "its joint blocks are 1536 wide (SD3 Medium; SD3.5 Medium would also adapt attn2 layers)")
    sd3_like = family == SD3_FAMILY or any(_SD3_ONLY.match(k) for k in keys)
    if claim in ("sd3", "sd35-medium", "sd35-large") and (sd3_like or claim):
        return Detection(claim, f"its keys fit {ARCHITECTURES[claim].title} (width {width}); the metadata says so")
    if claim == "flux" and not sd3_like:
        return Detection("flux", f"its keys fit Flux.1 (width {width}); the metadata says so")
    if sd3_like:
        return Detection("sd3", "its keys name SD3 (MMDiT) blocks")
    return Detection(UNKNOWN, f"its transformer blocks are {width} wide, which is neither Flux.1 (3072) nor SD3 (1536, 2432)")
