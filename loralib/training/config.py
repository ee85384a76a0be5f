"""The training configuration: a TOML file validated against dataclasses (:mod:`.schema`).

The file has seven sections (``[model]``, ``[data]``, ``[network]``, ``[training]``,
``[validation]``, ``[output]``, ``[sampling]``). Every key name is unique across sections, so the tutorial's flat files
(``rank = 8`` at the top level) are accepted too, and every key can be overridden on the command
line as ``--key-name value``. Unknown keys and bad values are all reported at once, each with its
path (``training.learning_rate``). :func:`default_toml` writes a fully commented default file
generated from the model, and :func:`reference_markdown` the reference table in the docs.

Relative paths written in a config file are relative to that file; those given as overrides
are relative to the working directory.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import textwrap
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import InvalidArgumentError
from . import schema
from .schema import setting

#: Values in kohya's block_dims / block_alphas: 25 for SD1 and SD2 (12 down, 1 middle, 12 up), 23 for SDXL.
BLOCK_LENGTHS = (23, 25)
#: kohya's learning-rate weight presets, optionally with a base added (``sine+0.5``).
LR_WEIGHT_PRESET = re.compile(r"(cosine|sine|linear|reverse_linear|zeros)(\+\d+(\.\d+)?)?")
#: Optimizers whose step works tensor by tensor (usable with fused_backward_pass).
PER_TENSOR_OPTIMIZERS = ("adafactor", "adamw", "adam", "sgd")
#: Optional packages some optimizers need: (module, what to install).
OPTIMIZER_PACKAGES = {"adamw8bit": ("bitsandbytes", "pip install bitsandbytes (it needs a CUDA GPU)"),
                      "prodigy": ("prodigyopt", "pip install prodigyopt (or pip install 'lorareg[train]')")}


def _number_list(value: Any, *, integer: bool, low: float, high: float, lengths, positive: bool = False) -> str | None:
    """Check a kohya-style list of numbers (a comma-separated string or a TOML list); returns it as ``"a,b,c"``."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    elif isinstance(value, str):
        parts = value.split(",")
    else:
        raise ValueError("must be comma-separated numbers or a list of numbers")
    numbers = []
    for part in (p.strip() for p in parts):
        try:
            number = int(part) if integer else float(part)
        except ValueError as exc:
            kind = "whole numbers" if integer else "numbers"
            raise ValueError(f"must be comma-separated {kind}; {part!r} is not one") from exc
        if not math.isfinite(number) or not low <= number <= high or (positive and number <= 0):
            bound = f"greater than {low}" if positive else f"at least {low}"
            raise ValueError(f"values must be {bound} and at most {high:g}; {part} is not")
        numbers.append(part)
    if len(numbers) not in lengths:
        if lengths == BLOCK_LENGTHS:
            expected = "25 values for SD1/SD2 or 23 for SDXL (kohya's block layout)"
        else:
            expected = f"1 to {max(lengths)} values"
        raise ValueError(f"needs {expected}, not {len(numbers)}")
    return ",".join(numbers)


def parse_indices(text: str) -> set[int]:
    """sd-scripts' block indices: ``"0-5,10"`` -> ``{0, 1, 2, 3, 4, 5, 10}`` (``"all"``: every block, as None)."""
    chosen: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d{1,3})(?:-(\d{1,3}))?", part)
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise ValueError(f"must be block numbers and ranges like 0-5,10; {part!r} is not one")
        chosen.update(range(int(match.group(1)), int(match.group(2) or match.group(1)) + 1))
    return chosen


def parse_optimizer_args(items: list[str]) -> dict[str, Any]:
    """``["d_coef=2", "decouple=true", "betas=0.9,0.99"]`` -> ``{"d_coef": 2, "decouple": True, "betas": (0.9, 0.99)}``.

    Values are numbers, true/false/none, comma-separated numbers (a tuple) or text; numbers must be finite.
    """
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"each entry must be key=value, not {item!r}")
        values = [_scalar(v.strip()) for v in text.split(",")] if "," in text else [_scalar(text.strip())]
        for value in values:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, not {text.strip()}")
        parsed[key] = tuple(values) if len(values) > 1 else values[0]
    return parsed


def _scalar(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _combination_problems(config: TrainConfig) -> list[str]:
    """Settings that are fine alone and wrong together."""
    data, net, train, val = config.data, config.network, config.training, config.validation
    problems = []
    step = data.bucket_step
    if data.enable_bucket and data.resolution % step:
        problems.append(f"data.resolution ({data.resolution}) must be a multiple of data.bucket_step ({step}) "
                        "when bucketing")
    if net.network_type == "dora" and not _format_holds(config.output.output_format, "dora"):
        problems.append(f"output.output_format = \"{config.output.output_format}\" cannot hold DoRA: set "
                        "output_format = \"kohya\" (LyCORIS' dora_scale) or \"peft\" (use_dora)")
    problems += _lycoris_problems(config)
    if net.network_type == "dora" and train.base_weights_dtype != "default":
        problems.append("training.base_weights_dtype: 8-bit base weights do not work with DoRA (its magnitudes are "
                        "computed from the base weights); use base_weights_dtype = \"default\"")
    if (net.conv_block_dims or net.conv_block_alphas) and net.target_modules != "locon":
        problems.append("network.conv_block_dims and conv_block_alphas need target_modules = \"locon\"")
    if net.block_alphas and not net.block_dims:
        problems.append("network.block_alphas needs block_dims")
    if net.conv_block_alphas and not net.conv_block_dims:
        problems.append("network.conv_block_alphas needs conv_block_dims")
    if train.optimizer in OPTIMIZER_PACKAGES:
        module, install = OPTIMIZER_PACKAGES[train.optimizer]
        if importlib.util.find_spec(module) is None:
            problems.append(f"training.optimizer: {train.optimizer} needs the {module} package, which is not "
                            f"installed: {install}")
    if train.fused_backward_pass:
        if train.optimizer not in PER_TENSOR_OPTIMIZERS:
            problems.append(f"training.fused_backward_pass works with {', '.join(PER_TENSOR_OPTIMIZERS)}, not "
                            f"{train.optimizer}")
        if train.gradient_accumulation_steps != 1:
            problems.append("training.fused_backward_pass needs gradient_accumulation_steps = 1")
        if train.mixed_precision == "fp16":
            problems.append("training.fused_backward_pass does not work with fp16 loss scaling; use bf16")
    if data.mask_dir is not None and not data.masked_loss:
        problems.append("data.mask_dir is set but masked_loss is off: set masked_loss = true")
    if val.validation_split > 0 and val.validation_dir is not None:
        problems.append("validation: set validation_split or validation_dir, not both")
    if (val.validate_every_n_steps or val.validate_every_n_epochs) and not config.has_validation:
        problems.append("validation.validate_every_n_steps/epochs need validation_split or validation_dir")
    return problems


def _lycoris_problems(config: TrainConfig) -> list[str]:
    """Settings that LoHa/LoKr training cannot honour (and LoKr's settings without LoKr)."""
    net, kind = config.network, config.network.network_type
    problems = []
    if kind != "lokr" and (net.factor != -1 or net.decompose_both):
        problems.append("network.factor and decompose_both are LoKr settings: set network_type = \"lokr\"")
    if kind not in ("loha", "lokr"):
        return problems
    title = {"loha": "LoHa", "lokr": "LoKr"}[kind]
    if config.output.output_format != "kohya" and not _format_holds(config.output.output_format, kind):
        problems.append(f"output.output_format = \"{config.output.output_format}\" cannot hold {title} modules: set "
                        "output_format = \"kohya\" (LyCORIS keys, which ComfyUI, A1111, Forge and LyCORIS load)")
    if net.dropout:
        problems.append(f"network.dropout: {title} has no input dropout (LyCORIS has none either); set dropout = 0")
    if config.training.loraplus_lr_ratio is not None:
        problems.append(f"training.loraplus_lr_ratio: LoRA+ speeds up LoRA's up factors, which {title} does not have; "
                        "leave it unset")
    return problems


def _format_holds(name: str, kind: str) -> bool:
    """Whether the writer of format ``name`` stores modules of ``kind`` (asked of the format table only for
    DoRA, LoHa and LoKr runs)."""
    from ..formats.table import FORMATS

    return any(fmt.name == name and kind in fmt.holds_kinds for fmt in FORMATS)


class ConfigError(InvalidArgumentError):
    """A training configuration with unknown keys or bad values; ``problems`` lists each one."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__(f"{source} has {count}: " + "; ".join(problems),
                         "Fix them and run again (lorareg train --print-config shows every key with its meaning)")


# Upper bounds on values that would otherwise run out of memory or never finish (a 1,048,576-pixel
# side, a bucket table up to an infinite aspect ratio); NaN and infinities are refused everywhere.
MAX_RESOLUTION = 8192
MAX_ASPECT_RATIO = 16.0


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError(f"must be a multiple of 8 (the VAE works on 8x8 pixel blocks), not {value}")
    return value


def _indices(value: Any) -> str | None:
    if value is None:
        return None
    parse_indices(str(value))
    return str(value).replace(" ", "")


def _in_dims(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    parts = [p.strip() for p in str(value).strip().strip("[]").split(",")]
    if len(parts) != 5 or not all(p.isdigit() for p in parts):
        raise ValueError("give 5 ranks (img_in, time_in, vector_in, guidance_in, txt_in), e.g. \"4,0,0,0,4\"")
    return ",".join(parts)


def _factor(value: int) -> int:
    if value == 0:
        raise ValueError("must be -1 (automatic) or a positive whole number, not 0")
    return value


def _ranks(value: Any) -> str | None:
    return _number_list(value, integer=True, low=0, high=4096, lengths=BLOCK_LENGTHS)


def _alphas(value: Any) -> str | None:
    return _number_list(value, integer=False, low=0, high=1e6, lengths=BLOCK_LENGTHS, positive=True)


def _outer_weights(value: Any) -> str | None:
    if isinstance(value, str) and LR_WEIGHT_PRESET.fullmatch(value.strip()):
        return value.strip()
    return _number_list(value, integer=False, low=0, high=1e3, lengths=range(1, 13))


def _mid_weights(value: Any) -> str | None:
    return _number_list(value, integer=False, low=0, high=1e3, lengths=range(1, 4))


def _key_values(value: list[str]) -> list[str]:
    parse_optimizer_args(value)
    return value


@dataclass(eq=True)
class ModelSection:
    """What to train on and what to call the result."""

    model_name: str = setting("my-lora", min_length=1, pattern=r"^[^/\\:*?\"<>|]+$",
                            description="Name of the adapter: its file name, output folder and catalog name.")
    base_model: str = setting("stable-diffusion-v1-5/stable-diffusion-v1-5", min_length=1,
                            description="Base model: a Hugging Face Hub id, a local diffusers folder, or a "
                                        "single-file .safetensors checkpoint.")
    base_components: str | None = setting(None, min_length=1,
                                        description="A diffusers folder whose VAE, text encoders, tokenizers and "
                                                    "scheduler go with a transformer-only Flux.1 or SD3/SD3.5 "
                                                    "base_model file (flux1-dev.safetensors and the like).")


@dataclass(eq=True)
class DataSection:
    """Where the images and captions are and how they are prepared."""

    data_dir: Path = setting(Path("data"), description="Dataset folder: images/ + texts/ (tutorial layout), images "
                                                       "with captions beside them (kohya layout, N_name repeat "
                                                       "folders), or a metadata.jsonl.")
    caption_extension: str = setting(".txt", pattern=r"^\.\w+$", description="Extension of caption files.")
    resolution: int = setting(512, ge=8, le=MAX_RESOLUTION,
                            after=_multiple_of_8, description="Training resolution in pixels (square side; with bucketing "
                                        "the area of every bucket).")
    crop: Literal["center", "random"] = setting("center", description="How images are cropped to the training size.")
    random_flip: bool = setting(False, description="Flip images horizontally at random.")
    enable_bucket: bool = setting(False, description="Aspect-ratio bucketing: group images of similar shape and "
                                                     "train each group at its own size instead of cropping to a square.")
    bucket_step: int = setting(64, ge=8, le=MAX_RESOLUTION, after=_multiple_of_8, description="Bucket sides are multiples of this many pixels.")
    max_aspect_ratio: float = setting(2.0, ge=1.0, le=MAX_ASPECT_RATIO,
                                    description="Widest bucket shape (long side / short side).")
    caption_dropout: float = setting(0.0, ge=0.0, lt=1.0,
                                   description="Probability of training an image with an empty caption.")
    trigger_word: str | None = setting(None, description="The phrase that invokes the adapter (recorded in the "
                                                         "file's metadata and the catalog).")
    cache_latents: bool = setting(True, description="Encode every image with the VAE once, before training "
                                                    "(not with random crop or flip).")
    cache_text_embeddings: bool = setting(True, description="Encode every caption once, before training (not when "
                                                            "the text encoder is trained).")
    num_workers: int | None = setting(None, ge=0, description="Data-loading worker processes when images are loaded "
                                                              "at every step (0: in the training process; default: up to "
                                                              "4 on machines with 4 or more cores).")
    cache_to_disk: bool = setting(False, description="Keep cached latents and caption embeddings in files under "
                                                     "cache_dir instead of memory (datasets larger than memory; later "
                                                     "runs reuse them).")
    cache_dir: Path | None = setting(None, description="Folder of the disk cache (default: <output_dir>/cache). Entries "
                                                       "are keyed by image file, size, date, crop, resolution, caption "
                                                       "and model, so a change never reuses a stale one.")
    folder_class_tokens: bool = setting(False, description="In kohya N_name folders, caption an image that has no "
                                                           "caption file with the folder's name after N_ (kohya's class "
                                                           "tokens) instead of reporting it.")
    shuffle_caption: bool = setting(False, description="Shuffle the comma-separated tags of each caption at every step "
                                                       "(the first keep_tokens tags stay in place).")
    keep_tokens: int = setting(0, ge=0, le=1000, description="Leading comma-separated tags that shuffle_caption and "
                                                             "caption_tag_dropout leave alone (a trigger word).")
    caption_tag_dropout: float = setting(0.0, ge=0.0, lt=1.0, description="Probability of leaving out each tag "
                                                                          "(after the first keep_tokens) at every step.")
    masked_loss: bool = setting(False, description="Weight the loss by a mask per image: white trains, black is ignored. "
                                                   "Masks come from mask_dir, or from each image's alpha channel.")
    mask_dir: Path | None = setting(None, description="Folder of mask images named like the training images (kohya's "
                                                      "conditioning_data_dir convention; the red channel is used). "
                                                      "Default: the images' alpha channels.")


@dataclass(eq=True)
class NetworkSection:
    """The LoRA layers that are trained."""

    rank: int = setting(8, ge=1, description="LoRA rank (network_dim).")
    alpha: float | None = setting(None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. "
                                                          "Default: equal to rank.")
    target_modules: Literal["attention", "transformer", "locon"] = setting(
        "transformer", description="Layers to adapt: attention (q, k, v, out); transformer (attention, feed-forward "
                                   "and projections, like kohya's LoRA); locon (transformer plus the ResNet convs).")
    conv_rank: int | None = setting(None, ge=1, description="Rank of conv layers with target_modules = locon "
                                                            "(default: rank).")
    conv_alpha: float | None = setting(None, gt=0, description="Alpha of conv layers (default: conv_rank).")
    dropout: float = setting(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    train_text_encoder: bool = setting(False, description="Also train LoRA layers in the text encoder(s).")
    network_type: Literal["lora", "dora", "loha", "lokr"] = setting(
        "lora", description="lora; dora (weight-decomposed LoRA, peft's use_dora; saved in kohya format with "
                            "LyCORIS' dora_scale, or as a PEFT folder); loha or lokr (LyCORIS' LoHa and LoKr, "
                            "kohya's algo=loha/lokr; saved in kohya format with LyCORIS keys). LoCon is lora "
                            "with target_modules = \"locon\".")
    factor: int = setting(-1, ge=-1, after=_factor, description="LoKr: split each side of a weight into two factors with the smaller at "
                                                                "most this (LyCORIS' factor; -1: as close to square as possible).")
    decompose_both: bool = setting(False, description="LoKr: make the smaller Kronecker factor low-rank too (LyCORIS' "
                                                      "decompose_both).")
    block_dims: str | None = setting(None, before=_ranks, description="Rank per UNet block, kohya's block_dims: 25 comma-separated "
                                                                      "values for SD1/SD2, 23 for SDXL; 0 leaves a block out.")
    block_alphas: str | None = setting(None, before=_alphas, description="Alpha per UNet block (kohya's block_alphas; default: alpha).")
    conv_block_dims: str | None = setting(None, before=_ranks, description="Rank of the 3x3 convs per UNet block with target_modules = "
                                                                           "locon (kohya's conv_block_dims; default: conv_rank).")
    conv_block_alphas: str | None = setting(None, before=_alphas, description="Alpha of the 3x3 convs per UNet block (default: "
                                                                              "conv_alpha).")
    down_lr_weight: str | None = setting(None, before=_outer_weights, description="Learning-rate factors of the UNet's down (input) blocks, "
                                                                                  "shallow to deep: 12 values for SD1/SD2, 9 for SDXL, or "
                                                                                  "cosine, sine, linear, reverse_linear, zeros (+base, e.g. "
                                                                                  "sine+0.5); missing values are 1, a 0 leaves a block out.")
    mid_lr_weight: str | None = setting(None, before=_mid_weights, description="Learning-rate factors of the UNet's middle block (1 value "
                                                                               "for SD1/SD2, 3 for SDXL).")
    up_lr_weight: str | None = setting(None, before=_outer_weights, description="Learning-rate factors of the UNet's up (output) blocks, deep "
                                                                                "to shallow, as down_lr_weight.")

    train_blocks: Literal["all", "double", "single"] = setting(
        "all", description="Flux.1/SD3 (sd-scripts' train_blocks): train the double (joint) blocks, the single "
                           "blocks (Flux.1) or all.")
    train_double_block_indices: str | None = setting(
        None, before=_indices, description="Flux.1/SD3: which double (SD3: joint) blocks get LoRA layers, e.g. \"0-5,10\" "
                                           "(sd-scripts' train_double_block_indices; default: all).")
    train_single_block_indices: str | None = setting(
        None, before=_indices, description="Flux.1: which single blocks get LoRA layers, e.g. \"0-18\" (default: all).")
    img_attn_dim: int | None = setting(None, ge=0, description="Flux.1: rank of the double blocks' image attention "
                                                               "(img_attn; sd-scripts' img_attn_dim); 0 leaves it out; "
                                                               "default: rank.")
    txt_attn_dim: int | None = setting(None, ge=0, description="Flux.1: rank of the double blocks' text attention "
                                                               "(txt_attn); 0 leaves it out; default: rank.")
    img_mlp_dim: int | None = setting(None, ge=0, description="Flux.1: rank of the double blocks' image MLP (img_mlp); "
                                                              "0 leaves it out; default: rank.")
    txt_mlp_dim: int | None = setting(None, ge=0, description="Flux.1: rank of the double blocks' text MLP (txt_mlp); "
                                                              "0 leaves it out; default: rank.")
    img_mod_dim: int | None = setting(None, ge=0, description="Flux.1: rank of the double blocks' image modulation "
                                                              "(img_mod.lin), which is trained only when this is given.")
    txt_mod_dim: int | None = setting(None, ge=0, description="Flux.1: rank of the double blocks' text modulation "
                                                              "(txt_mod.lin), trained only when given.")
    single_dim: int | None = setting(None, ge=0, description="Flux.1: rank of the single blocks' linear1 (q, k, v, "
                                                             "mlp) and linear2; 0 leaves them out; default: rank.")
    single_mod_dim: int | None = setting(None, ge=0, description="Flux.1: rank of the single blocks' modulation "
                                                                 "(modulation.lin), trained only when given.")
    in_dims: str | None = setting(None, before=_in_dims, description="Flux.1: ranks of the input layers img_in, time_in, vector_in, "
                                                                     "guidance_in, txt_in (sd-scripts' in_dims, e.g. \"4,0,0,0,4\"); "
                                                                     "0 or unset: not trained.")
    x_attn_dim: int | None = setting(None, ge=0, description="SD3/SD3.5: rank of the joint blocks' image attention "
                                                             "(x_block attn, attn2; sd-scripts' x_attn_dim); 0 leaves it "
                                                             "out; default: rank.")
    context_attn_dim: int | None = setting(None, ge=0, description="SD3/SD3.5: rank of the joint blocks' text "
                                                                   "attention (context_block attn); default: rank.")
    x_mlp_dim: int | None = setting(None, ge=0, description="SD3/SD3.5: rank of the joint blocks' image MLP (x_block "
                                                            "mlp); default: rank.")
    context_mlp_dim: int | None = setting(None, ge=0, description="SD3/SD3.5: rank of the joint blocks' text MLP "
                                                                  "(context_block mlp); default: rank.")
    x_mod_dim: int | None = setting(None, ge=0, description="SD3/SD3.5: rank of the joint blocks' image modulation "
                                                            "(x_block adaLN_modulation), trained only when given.")
    context_mod_dim: int | None = setting(None, ge=0, description="SD3/SD3.5: rank of the joint blocks' text "
                                                                  "modulation (context_block adaLN_modulation), trained "
                                                                  "only when given.")


@dataclass(eq=True)
class TrainingSection:
    """The optimisation."""

    num_epochs: int = setting(10, ge=1, description="Passes over the dataset (repeats included).")
    max_train_steps: int | None = setting(None, ge=1, description="Stop after this many optimizer steps "
                                                                  "(overrides num_epochs).")
    batch_size: int = setting(1, ge=1, description="Images per step on each device.")
    gradient_accumulation_steps: int = setting(1, ge=1, description="Batches accumulated per optimizer step.")
    learning_rate: float = setting(1e-4, gt=0, description="Learning rate of the UNet's LoRA layers.")
    text_encoder_lr: float | None = setting(None, gt=0, description="Learning rate of the text encoders' LoRA layers "
                                                                    "(default: learning_rate).")
    optimizer: Literal["adamw", "adam", "sgd", "adamw8bit", "prodigy", "adafactor"] = setting(
        "adamw", description="Optimizer. prodigy sets its own step size (use learning_rate = 1.0); adafactor is "
                             "transformers' Adafactor with a fixed learning rate; adamw8bit needs the bitsandbytes "
                             "package and a GPU.")
    optimizer_args: list[str] = setting(default_factory=list, after=_key_values, description="Extra optimizer arguments as key=value "
                                                                                             "(kohya's optimizer_args), e.g. d_coef=2 or "
                                                                                             "betas=0.9,0.99.")
    weight_decay: float = setting(1e-2, ge=0, description="Weight decay of AdamW.")
    loraplus_lr_ratio: float | None = setting(None, gt=0, le=1e4,
                                            description="LoRA+: the up (B) factors learn this many times faster than "
                                                        "the down (A) factors (16 is the paper's value).")
    fused_backward_pass: bool = setting(False, description="Step the optimizer on each tensor as soon as its gradient "
                                                           "is ready and free the gradient (saves memory; adafactor, "
                                                           "adamw, adam or sgd; no accumulation; clipping per tensor).")
    max_grad_norm: float | None = setting(1.0, gt=0, description="Clip gradients to this norm (none: no clipping).")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = setting("constant", description="Learning-rate schedule.")
    lr_warmup_steps: int = setting(0, ge=0, description="Steps of linear warm-up at the start of the schedule.")
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", description="Mixed precision (fp16 needs a GPU).")
    gradient_checkpointing: bool = setting(False, description="Trade compute for memory in the UNet and text encoders.")
    base_weights_dtype: Literal["default", "fp8_e4m3fn", "fp8_e5m2"] = setting(
        "default", description="Storage of the frozen base weights: default (the mixed_precision dtype) or 8-bit "
                               "floats, computed in the mixed_precision dtype (needs a CUDA GPU).")
    seed: int = setting(42, ge=0, description="Seed of everything random; the same seed gives the same adapter.")
    snr_gamma: float | None = setting(None, gt=0, description="Min-SNR loss weighting gamma (5.0 is the usual value).")
    noise_offset: float = setting(0.0, ge=0, le=1.0, description="Noise offset (0.05-0.1 helps very dark or bright images).")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = setting(
        "auto", description="What the UNet predicts; auto reads it from the base model's scheduler config.")
    weighting_scheme: Literal["auto", "none", "logit_normal", "mode", "cosmap", "sigma_sqrt"] = setting(
        "auto", description="Flux.1/SD3 (flow matching): how noise levels are drawn and the loss weighted, as "
                            "diffusers' scripts do; auto is none (uniform) for Flux.1 and logit_normal for SD3.")
    logit_mean: float = setting(0.0, ge=-10, le=10,
                              description="Mean of the logit-normal noise-level distribution (weighting_scheme).")
    logit_std: float = setting(1.0, gt=0, le=10,
                             description="Standard deviation of the logit-normal noise-level distribution.")
    mode_scale: float = setting(1.29, ge=-1, le=10,
                              description="Scale of the mode weighting scheme.")
    guidance_scale: float = setting(3.5, ge=0, le=100,
                                  description="Flux.1 dev: the guidance input of the transformer while training.")
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = setting(
        "l2", description="Loss between prediction and target: l2 (MSE), l1, huber or smooth_l1 (pseudo-Huber, "
                          "sd-scripts' definitions).")
    huber_c: float = setting(0.1, gt=0, le=1, description="Huber threshold c (between 0 and 1).")
    huber_schedule: Literal["constant", "exponential", "snr"] = setting(
        "snr", description="How c varies with the timestep: constant (c · huber_scale), exponential (from "
                           "huber_scale at t = 0 down to c · huber_scale) or snr (sd-scripts' default).")
    huber_scale: float = setting(1.0, gt=0, le=1e3,
                               description="Scale of the constant and exponential Huber schedules.")
    debiased_estimation: bool = setting(False, description="Weight the loss by 1/sqrt(SNR) (1/(SNR+1) for "
                                                           "v-prediction): debiased estimation loss.")
    multires_noise_iterations: int = setting(0, ge=0, le=64, description="Multi-resolution (pyramid) noise levels; "
                                                                         "0: off, 6-10 typical.")
    multires_noise_discount: float = setting(0.3, gt=0, le=1,
                                           description="Weight of each coarser level of multires noise.")
    ip_noise_gamma: float = setting(0.0, ge=0, le=1,
                                  description="Input-perturbation noise strength (0.1 typical; 0: off).")
    ema_decay: float | None = setting(None, gt=0, lt=1,
                                    description="Keep an exponential moving average of the LoRA weights with this "
                                                "decay (e.g. 0.999; warmed up as min(decay, (1+t)/(10+t))).")
    ema_on_cpu: bool = setting(False, description="Keep the EMA copy in CPU memory instead of on the GPU.")
    save_ema: bool = setting(True, description="With ema_decay: save the EMA weights as the adapter (false: the raw "
                                               "trained weights; the EMA stays in the checkpoints).")


@dataclass(eq=True)
class ValidationSection:
    """A held-out loss at fixed timesteps and noise, comparable from one evaluation to the next."""

    validation_split: float = setting(0.0, ge=0.0, lt=1.0, description="Share of the dataset's images held out for "
                                                                       "the validation loss (not trained on).")
    validation_dir: Path | None = setting(None, description="A separate dataset folder (any layout) for the "
                                                            "validation loss.")
    validation_seed: int | None = setting(None, ge=0, description="Seed of the split and the validation noise "
                                                                  "(default: seed).")
    validate_every_n_steps: int | None = setting(None, ge=1, description="Measure the validation loss every N steps.")
    validate_every_n_epochs: int | None = setting(None, ge=1, description="Measure the validation loss every N epochs "
                                                                          "(default, without either: every epoch).")


@dataclass(eq=True)
class OutputSection:
    """Where and how results are written."""

    output_dir: Path | None = setting(None, description="Output folder with the adapter, checkpoints/, samples/ "
                                                        "and runs/ (default: output/<model_name>).")
    output_format: Literal["kohya", "peft", "diffusers"] = setting("kohya", description="Format of the saved adapter.")
    save_dtype: Literal["fp32", "fp16", "bf16"] = setting("fp16", description="Precision of the saved adapter.")
    save_every_n_epochs: int | None = setting(None, ge=1, description="Also save the adapter and a checkpoint every "
                                                                      "N epochs.")
    save_every_n_steps: int | None = setting(None, ge=1, description="Also save the adapter and a checkpoint every "
                                                                     "N steps.")
    checkpoints_total_limit: int | None = setting(3, ge=1, description="Keep only the newest N checkpoints "
                                                                       "(none: keep all).")
    tensorboard: bool = setting(True, description="Write TensorBoard logs (loss, learning rate, samples) under runs/.")


@dataclass(eq=True)
class SamplingSection:
    """Sample images rendered while training."""

    sample_prompts: list[str] = setting(default_factory=list, description="Prompts rendered at every sample point, "
                                                                          "into samples/.")
    sample_every_n_epochs: int | None = setting(None, ge=1, description="Render the sample prompts every N epochs.")
    sample_every_n_steps: int | None = setting(None, ge=1, description="Render the sample prompts every N steps.")
    sample_steps: int = setting(20, ge=1, description="Denoising steps per sample.")
    sample_guidance_scale: float = setting(7.0, ge=0, description="Classifier-free guidance scale of the samples.")
    sample_negative_prompt: str = setting("", description="Negative prompt of the samples.")
    sample_seed: int = setting(0, ge=0, description="Seed of the samples (the same at every sample point).")


SECTIONS: dict[str, type] = {
    "model": ModelSection, "data": DataSection, "network": NetworkSection, "training": TrainingSection,
    "validation": ValidationSection, "output": OutputSection, "sampling": SamplingSection,
}


@dataclass(eq=True)
class TrainConfig:
    """A complete, validated training configuration (build it with :func:`load_config` or
    :meth:`model_validate`; assigning to a field later is not validated)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    output: OutputSection = field(default_factory=OutputSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)

    @classmethod
    def model_validate(cls, data: dict[str, Any], source: str = "the training configuration") -> TrainConfig:
        """Validate nested values (``{"network": {"rank": 8}, ...}``); raises :class:`ConfigError` with
        every problem."""
        config, problems = _validate(data)
        if problems:
            raise ConfigError(source, problems)
        return config

    def model_dump(self, mode: str = "python") -> dict[str, dict[str, Any]]:
        """Every section's values (``mode="json"``: paths as text)."""
        return {name: schema.dump(getattr(self, name), json_ready=mode == "json") for name in SECTIONS}

    @property
    def has_validation(self) -> bool:
        """True when a validation set is configured."""
        return self.validation.validation_split > 0 or self.validation.validation_dir is not None

    @property
    def validation_seed(self) -> int:
        """Seed of the validation split and noise with its default (= seed) applied."""
        seed = self.validation.validation_seed
        return self.training.seed if seed is None else seed

    @property
    def cache_dir(self) -> Path:
        """The disk cache folder with its default (``<output_dir>/cache``) applied."""
        return self.data.cache_dir or self.output_dir / "cache"

    @property
    def randomizes_captions(self) -> bool:
        """True when a caption changes from step to step (its embedding cannot be cached)."""
        return self.data.shuffle_caption or self.data.caption_tag_dropout > 0

    @property
    def alpha(self) -> float:
        """LoRA alpha with its default (= rank) applied."""
        return float(self.network.alpha if self.network.alpha is not None else self.network.rank)

    @property
    def conv_rank(self) -> int:
        """Rank of conv layers (LoCon) with its default applied."""
        return self.network.conv_rank or self.network.rank

    @property
    def conv_alpha(self) -> float:
        """Alpha of conv layers with its default applied."""
        return float(self.network.conv_alpha if self.network.conv_alpha is not None else self.conv_rank)

    @property
    def text_encoder_lr(self) -> float:
        """Text-encoder learning rate with its default applied."""
        return self.training.text_encoder_lr or self.training.learning_rate

    @property
    def output_dir(self) -> Path:
        """The output folder with its default (``output/<model_name>``) applied."""
        return self.output.output_dir or Path("output") / self.model.model_name

    def flat(self) -> dict[str, Any]:
        """Every key and its value, without sections (JSON-compatible)."""
        return {key: value for section in self.model_dump(mode="json").values() for key, value in section.items()}

    def to_toml(self, *, comments: bool = True) -> str:
        """This configuration as a TOML file, each key with its description when ``comments``."""
        return _toml(self, comments)


def _field_table() -> dict[str, str]:
    table = {}
    for section, model in SECTIONS.items():
        for name in schema.fields_of(model):
            if name in table:  # a programming error, caught by the tests
                raise AssertionError(f"config key {name} appears in [{table[name]}] and [{section}]")
            table[name] = section
    return table


#: Section of every key: ``{"rank": "network", ...}``.
KEY_SECTIONS: dict[str, str] = _field_table()


def field_info(key: str) -> schema.FieldInfo:
    """What the configuration declares about a key (``.annotation``, ``.description``, ``.default``)."""
    return schema.fields_of(SECTIONS[KEY_SECTIONS[key]])[key]


def is_flag(key: str) -> bool:
    """True when the key holds a boolean (a ``--key/--no-key`` switch on the command line)."""
    return field_info(key).base is bool


def is_optional(key: str) -> bool:
    """True when the key may be left unset (``None``)."""
    return field_info(key).optional


def is_list(key: str) -> bool:
    """True when the key holds a list (an option that may be repeated)."""
    return typing.get_origin(field_info(key).base) is list


def choices(key: str) -> tuple[str, ...] | None:
    """The allowed values of a key that takes one of a fixed set."""
    return field_info(key).choices


def _validate(data: Any) -> tuple[TrainConfig | None, list[str]]:
    """Every section validated, then the settings that only fail together; ``(config or None, problems)``."""
    if not isinstance(data, dict):
        return None, ["config: input should be a valid dictionary"]
    sections, problems = {}, []
    for name, model in SECTIONS.items():
        if name in data:
            sections[name], found = schema.validate(model, data[name], name)
            problems += found
    problems += [f"{name}: unknown key{schema.did_you_mean(str(name), list(SECTIONS))}"
                 for name in data if name not in SECTIONS]
    if problems:
        return None, problems
    config = TrainConfig(**sections)
    problems = _combination_problems(config)
    return (None if problems else config), problems


def _nest(data: dict[str, Any], problems: list[str]) -> dict[str, dict[str, Any]]:
    """Accept flat keys (the tutorial's layout) beside sections; unknown top-level keys are problems."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{key}: must be a [{key}] section, not a value")
                continue
            nested.setdefault(key, {}).update(value)
        elif key in KEY_SECTIONS:
            nested.setdefault(KEY_SECTIONS[key], {})[key] = value
        else:  # a table was meant to be a section, a value a key
            known = list(SECTIONS) if isinstance(value, dict) else list(KEY_SECTIONS)
            problems.append(f"{key}: unknown {'section' if isinstance(value, dict) else 'key'}"
                            f"{schema.did_you_mean(key, known)}")
    return nested


def _resolve_paths(nested: dict[str, dict[str, Any]], base: Path) -> None:
    """Make the paths written in a config file relative to the file's folder."""
    for section, key in (("data", "data_dir"), ("output", "output_dir"), ("data", "cache_dir"), ("data", "mask_dir"),
                         ("validation", "validation_dir")):
        value = nested.get(section, {}).get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            nested[section][key] = str(base / value)
    components = nested.get("model", {}).get("base_components")
    if isinstance(components, str) and components and not Path(components).expanduser().is_absolute():
        nested["model"]["base_components"] = str(base / components)
    base_model = nested.get("model", {}).get("base_model")
    if isinstance(base_model, str) and base_model and not Path(base_model).expanduser().is_absolute():
        candidate = base / base_model
        if candidate.exists():
            nested["model"]["base_model"] = str(candidate)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The raw contents of a TOML config file (syntax errors become one clear line)."""
    from ..errors import InputNotFoundError

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"config file {path} does not exist", "Check the path, or write one with "
                                                                       "lorareg train --print-config > train.toml")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), ["not a UTF-8 text file"]) from exc


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML config (optional), apply ``overrides`` (flat key or ``section.key`` -> value), validate.

    Every problem — in the file and in the overrides — is reported in one :class:`ConfigError`.
    """
    problems: list[str] = []
    nested: dict[str, dict[str, Any]] = {}
    source = "the training configuration"
    if path is not None:
        source = str(path)
        nested = _nest(read_toml(path), problems)
        _resolve_paths(nested, Path(path).resolve().parent)
    for key, value in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        name = name.replace("-", "_")
        section = section or KEY_SECTIONS.get(name, "")
        if section not in SECTIONS:
            problems.append(f"{key}: unknown key{schema.did_you_mean(name, list(KEY_SECTIONS))}")
            continue
        nested.setdefault(section, {})[name] = str(value) if isinstance(value, Path) else value
    config, found = _validate(nested)
    problems += found
    if problems:
        raise ConfigError(source, problems)
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def _allowed(key: str) -> str | None:
    options = choices(key)
    return " | ".join(options) if options else None


def _toml(config: TrainConfig, comments: bool) -> str:
    lines = ["# lorareg training configuration (lorareg train --print-config).",
             "# Every key can also be given on the command line: --key-name value.", ""] if comments else []
    for section, model in SECTIONS.items():
        values = getattr(config, section)
        if comments:
            lines.append(f"# {model.__doc__.strip()}")
        lines.append(f"[{section}]")
        for key, info in schema.fields_of(model).items():
            value = getattr(values, key)
            if comments:
                lines += [f"# {line}" for line in textwrap.wrap(info.description, 96)]
                if allowed := _allowed(key):
                    lines.append(f"# One of: {allowed}.")
            # TOML has no null: an unset optional key is written commented out.
            lines.append(f"# {key} =" if value is None else f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def default_toml() -> str:
    """The fully commented default configuration file."""
    return TrainConfig().to_toml()


def reference_markdown() -> str:
    """The configuration reference table of docs/training.md, generated from the model."""
    rows = ["| key | section | default | meaning |", "|---|---|---|---|"]
    defaults = TrainConfig().model_dump(mode="json")
    for key, section in KEY_SECTIONS.items():
        default = defaults[section][key]
        shown = "—" if default is None else f"`{_toml_value(default)}`"
        meaning = field_info(key).description
        if options := choices(key):
            meaning += " One of: " + ", ".join(f"`{o}`" for o in options) + "."
        rows.append(f"| `{key}` | {section} | {shown} | {meaning} |")
    return "\n".join(rows)
