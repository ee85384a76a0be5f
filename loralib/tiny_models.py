"""Tiny random pipelines of every architecture lorareg knows, built offline in about a second.

They have the real diffusers/transformers classes and the real module names, with small widths
where that is harmless: SD1-shaped (one text encoder, cross-attention width 768), SD2-shaped
(cross-attention and text-encoder width 1024, linear projections, v-prediction),
SDXL-shaped (two text encoders of widths 768 and 1280, cross-attention width 2048, SDXL's block
layout, so SGM names match the full-size model), Flux.1-shaped (``FluxPipeline``: CLIP and T5
encoders, double and single blocks, guidance embedder) and SD3-shaped (``StableDiffusion3Pipeline``:
CLIP-L, CLIP-G and T5, joint blocks whose last one is pre-only; ``sd35-medium`` adds ``attn2``
and ``qk_norm``, ``sd35-large`` ``qk_norm``). The transformers are 32 wide, so an adapter's
architecture among the transformer families is told by its structure and metadata, not by the
full-size widths. Tokenizers are built in code (transformers ships no vocabulary files). Used
by the demo, the tests and the benchmarks wherever a real base model cannot be downloaded.
"""

from __future__ import annotations

from pathlib import Path

TINY_ARCHITECTURES = ("sd1", "sd2", "sdxl", "flux", "sd3", "sd35-medium", "sd35-large")
_VOCAB_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def tiny_tokenizer():
    """A CLIP tokenizer over single characters (transformers ships no vocabulary files)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _VOCAB_CHARS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def tiny_t5_tokenizer():
    """A T5 (unigram) tokenizer over single characters, built in code."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(ch, -2.0) for ch in _VOCAB_CHARS] + [("\u2581" + ch, -1.5) for ch in _VOCAB_CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=77)


def _t5(width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=width, d_ff=48, d_kv=8, num_heads=4, num_layers=2, vocab_size=4 + 2 * len(_VOCAB_CHARS),
                                   feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))


def _text_config(hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=2 + 2 * len(_VOCAB_CHARS), max_position_embeddings=77, projection_dim=projection,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1, sample_size=64)


def _flow_vae(scaling: float, shift: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=8,
                         layers_per_block=1, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
                         scaling_factor=scaling, shift_factor=shift)


# The tiny transformers' configs (a single file of one is loaded with these, as a full-size one with
# the published configs of loralib.architectures).
_TINY_TRANSFORMER_CONFIGS: dict[str, dict] = {
    "flux": {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
             "axes_dims_rope": [4, 4, 8]},
    "sd3": {"sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
            "attention_head_dim": 8, "num_attention_heads": 4, "caption_projection_dim": 32, "joint_attention_dim": 64,
            "pooled_projection_dim": 64, "pos_embed_max_size": 16},
}


def tiny_transformer_config(family: str) -> dict:
    """A copy of the config of the tiny ``flux`` or ``sd3`` transformer."""
    return {k: list(v) if isinstance(v, list) else v for k, v in _TINY_TRANSFORMER_CONFIGS[family].items()}


def _flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel(**tiny_transformer_config("flux"))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(0.3611, 0.1159),
                        text_encoder=CLIPTextModel(_text_config(32, 32)), tokenizer=tiny_tokenizer(),
                        text_encoder_2=_t5(32), tokenizer_2=tiny_t5_tokenizer(), transformer=transformer)


def _sd3_pipeline(architecture: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    extra = {"sd35-medium": {"dual_attention_layers": (0,), "qk_norm": "rms_norm"},
             "sd35-large": {"qk_norm": "rms_norm"}}.get(architecture, {})
    transformer = SD3Transformer2DModel(**tiny_transformer_config("sd3"), **extra)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(1.5305, 0.0609),
        text_encoder=CLIPTextModelWithProjection(_text_config(32, 32)), tokenizer=tiny_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(32, 32)), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=_t5(64), tokenizer_3=tiny_t5_tokenizer(), transformer=transformer)


def build_tiny_pipeline(architecture: str = "sd1", seed: int = 0):
    """A tiny random pipeline of ``architecture`` (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``FluxPipeline`` or ``StableDiffusion3Pipeline``)."""
    import torch
    from diffusers import (
        DDPMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"tiny pipelines exist for {', '.join(TINY_ARCHITECTURES)}, not {architecture!r}")
    torch.manual_seed(seed)
    if architecture == "flux":
        return _flux_pipeline()
    if architecture in ("sd3", "sd35-medium", "sd35-large"):
        return _sd3_pipeline(architecture)
    if architecture in ("sd1", "sd2"):
        width = 768 if architecture == "sd1" else 1024  # SD2: OpenCLIP-H width, linear projections, v-prediction
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=width, sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8, norm_num_groups=8, use_linear_projection=architecture == "sd2")
        prediction = "epsilon" if architecture == "sd1" else "v_prediction"
        return StableDiffusionPipeline(
            unet=unet, vae=_vae(), text_encoder=CLIPTextModel(_text_config(width, width)), tokenizer=tiny_tokenizer(),
            scheduler=DDPMScheduler(clip_sample=False, steps_offset=1, prediction_type=prediction), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    time_dim, projection = 8, 32
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=2048, sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=8, norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + projection)
    return StableDiffusionXLPipeline(
        unet=unet, vae=_vae(), text_encoder=CLIPTextModel(_text_config(768, 768)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(1280, projection)),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), scheduler=EulerDiscreteScheduler())


def save_tiny_pipeline(path: str | Path, architecture: str = "sd1", seed: int = 0) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it to ``path``; returns the folder."""
    path = Path(path)
    build_tiny_pipeline(architecture, seed).save_pretrained(path)
    return path


def write_tiny_model(path: str | Path, architecture: str = "sd1", *, seed: int = 0, force: bool = False,
                     single_file: str | Path | None = None, single_file_prefix: str = "") -> Path:
    """Build a tiny pipeline and write it to the folder ``path`` atomically (for ``lorareg tiny-model``).

    With ``single_file`` (Flux.1 and SD3/SD3.5 only), the transformer is also written there as one
    ``.safetensors`` file in the original names (BFL / MMDiT, behind ``single_file_prefix``, e.g.
    ComfyUI's ``model.diffusion_model.``), as the published transformer files are.
    An existing non-empty folder or file is replaced only with ``force``.
    """
    import os
    import shutil

    from .errors import InvalidArgumentError, OutputExistsError
    from .files.atomic import sweep_stale, temp_name

    path = Path(path)
    if architecture not in TINY_ARCHITECTURES:
        raise InvalidArgumentError(f"tiny models exist for {', '.join(TINY_ARCHITECTURES)}, not {architecture!r}")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} is a file", "Give a folder path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExistsError(f"{path} already exists and is not empty", "Pass --force to replace it")
    family = {"flux": "flux", "sd3": "sd3", "sd35-medium": "sd3", "sd35-large": "sd3"}.get(architecture)
    if single_file is not None:
        from .files.atomic import refuse_overwrite

        if family is None:
            raise InvalidArgumentError(f"a single transformer file exists only for Flux.1 and SD3/SD3.5, not {architecture}",
                                       "Leave out --single-file, or pick --arch flux, sd3, sd35-medium or sd35-large")
        refuse_overwrite(single_file, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent)
    tmp = path.parent / temp_name(path.name)
    tmp.mkdir()
    try:
        pipe = build_tiny_pipeline(architecture, seed)
        pipe.save_pretrained(tmp)
        if single_file is not None:
            from .transformer_files import write_transformer_file

            Path(single_file).parent.mkdir(parents=True, exist_ok=True)
            write_transformer_file(pipe.transformer, family, single_file, prefix=single_file_prefix)
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
