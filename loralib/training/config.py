"""The training configuration: a TOML file validated by a pydantic model.

The file has six sections (``[model]``, ``[data]``, ``[network]``, ``[training]``, ``[output]``,
``[sampling]``). Every key name is unique across sections, so the tutorial's flat files
(``rank = 8`` at the top level) are accepted too, and every key can be overridden on the command
line as ``--key-name value``. Unknown keys and bad values are all reported at once, each with its
path (``training.learning_rate``). :func:`default_toml` writes a fully commented default file
generated from the model, and :func:`reference_markdown` the reference table in the docs.

Relative paths written in a config file are relative to that file; those given as overrides
are relative to the working directory.
"""

from __future__ import annotations

import difflib
import json
import textwrap
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import InvalidArgumentError


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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(_Section):
    """What to train on and what to call the result."""

    model_name: str = Field("my-lora", min_length=1, pattern=r"^[^/\\:*?\"<>|]+$",
                            description="Name of the adapter: its file name, output folder and catalog name.")
    base_model: str = Field("stable-diffusion-v1-5/stable-diffusion-v1-5", min_length=1,
                            description="Base model: a Hugging Face Hub id, a local diffusers folder, or a "
                                        "single-file .safetensors checkpoint.")


class DataSection(_Section):
    """Where the images and captions are and how they are prepared."""

    data_dir: Path = Field(Path("data"), description="Dataset folder: images/ + texts/ (tutorial layout), images "
                                                     "with captions beside them (kohya layout, N_name repeat "
                                                     "folders), or a metadata.jsonl.")
    caption_extension: str = Field(".txt", pattern=r"^\.\w+$", description="Extension of caption files.")
    resolution: int = Field(512, ge=8, le=MAX_RESOLUTION,
                            description="Training resolution in pixels (square side; with bucketing "
                                        "the area of every bucket).")
    crop: Literal["center", "random"] = Field("center", description="How images are cropped to the training size.")
    random_flip: bool = Field(False, description="Flip images horizontally at random.")
    enable_bucket: bool = Field(False, description="Aspect-ratio bucketing: group images of similar shape and "
                                                   "train each group at its own size instead of cropping to a square.")
    bucket_step: int = Field(64, ge=8, le=MAX_RESOLUTION, description="Bucket sides are multiples of this many pixels.")
    max_aspect_ratio: float = Field(2.0, ge=1.0, le=MAX_ASPECT_RATIO,
                                    description="Widest bucket shape (long side / short side).")
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0,
                                   description="Probability of training an image with an empty caption.")
    trigger_word: str | None = Field(None, description="The phrase that invokes the adapter (recorded in the "
                                                       "file's metadata and the catalog).")
    cache_latents: bool = Field(True, description="Encode every image with the VAE once, before training "
                                                  "(not with random crop or flip).")
    cache_text_embeddings: bool = Field(True, description="Encode every caption once, before training (not when "
                                                          "the text encoder is trained).")
    num_workers: int | None = Field(None, ge=0, description="Data-loading worker processes when images are loaded "
                                                         "at every step (0: in the training process; default: up to "
                                                         "4 on machines with 4 or more cores).")

    @field_validator("resolution", "bucket_step")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE works on 8x8 pixel blocks), not {value}")
        return value


class NetworkSection(_Section):
    """The LoRA layers that are trained."""

    rank: int = Field(8, ge=1, description="LoRA rank (network_dim).")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. "
                                                        "Default: equal to rank.")
    target_modules: Literal["attention", "transformer", "locon"] = Field(
        "transformer", description="Layers to adapt: attention (q, k, v, out); transformer (attention, feed-forward "
                                   "and projections, like kohya's LoRA); locon (transformer plus the ResNet convs).")
    conv_rank: int | None = Field(None, ge=1, description="Rank of conv layers with target_modules = locon "
                                                          "(default: rank).")
    conv_alpha: float | None = Field(None, gt=0, description="Alpha of conv layers (default: conv_rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    train_text_encoder: bool = Field(False, description="Also train LoRA layers in the text encoder(s).")


class TrainingSection(_Section):
    """The optimisation."""

    num_epochs: int = Field(10, ge=1, description="Passes over the dataset (repeats included).")
    max_train_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps "
                                                                "(overrides num_epochs).")
    batch_size: int = Field(1, ge=1, description="Images per step on each device.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches accumulated per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="Learning rate of the UNet's LoRA layers.")
    text_encoder_lr: float | None = Field(None, gt=0, description="Learning rate of the text encoders' LoRA layers "
                                                                  "(default: learning_rate).")
    optimizer: Literal["adamw", "adam", "sgd", "adamw8bit"] = Field(
        "adamw", description="Optimizer (adamw8bit needs the bitsandbytes package and a GPU).")
    weight_decay: float = Field(1e-2, ge=0, description="Weight decay of AdamW.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm (none: no clipping).")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = Field("constant", description="Learning-rate schedule.")
    lr_warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up at the start of the schedule.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Mixed precision (fp16 needs a GPU).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet and text encoders.")
    seed: int = Field(42, ge=0, description="Seed of everything random; the same seed gives the same adapter.")
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting gamma (5.0 is the usual value).")
    noise_offset: float = Field(0.0, ge=0, le=1.0, description="Noise offset (0.05-0.1 helps very dark or bright images).")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="What the UNet predicts; auto reads it from the base model's scheduler config.")


class OutputSection(_Section):
    """Where and how results are written."""

    output_dir: Path | None = Field(None, description="Output folder with the adapter, checkpoints/, samples/ "
                                                      "and runs/ (default: output/<model_name>).")
    output_format: Literal["kohya", "peft", "diffusers"] = Field("kohya", description="Format of the saved adapter.")
    save_dtype: Literal["fp32", "fp16", "bf16"] = Field("fp16", description="Precision of the saved adapter.")
    save_every_n_epochs: int | None = Field(None, ge=1, description="Also save the adapter and a checkpoint every "
                                                                    "N epochs.")
    save_every_n_steps: int | None = Field(None, ge=1, description="Also save the adapter and a checkpoint every "
                                                                   "N steps.")
    checkpoints_total_limit: int | None = Field(3, ge=1, description="Keep only the newest N checkpoints "
                                                                     "(none: keep all).")
    tensorboard: bool = Field(True, description="Write TensorBoard logs (loss, learning rate, samples) under runs/.")


class SamplingSection(_Section):
    """Sample images rendered while training."""

    sample_prompts: list[str] = Field(default_factory=list, description="Prompts rendered at every sample point, "
                                                                        "into samples/.")
    sample_every_n_epochs: int | None = Field(None, ge=1, description="Render the sample prompts every N epochs.")
    sample_every_n_steps: int | None = Field(None, ge=1, description="Render the sample prompts every N steps.")
    sample_steps: int = Field(20, ge=1, description="Denoising steps per sample.")
    sample_guidance_scale: float = Field(7.0, ge=0, description="Classifier-free guidance scale of the samples.")
    sample_negative_prompt: str = Field("", description="Negative prompt of the samples.")
    sample_seed: int = Field(0, ge=0, description="Seed of the samples (the same at every sample point).")


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSection, "data": DataSection, "network": NetworkSection,
    "training": TrainingSection, "output": OutputSection, "sampling": SamplingSection,
}


class TrainConfig(BaseModel):
    """A complete, validated training configuration."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    network: NetworkSection = Field(default_factory=NetworkSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        step = self.data.bucket_step
        if self.data.enable_bucket and self.data.resolution % step:
            raise ValueError(f"data.resolution ({self.data.resolution}) must be a multiple of data.bucket_step "
                             f"({step}) when bucketing")
        return self

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
        for name in model.model_fields:
            if name in table:  # a programming error, caught by the tests
                raise AssertionError(f"config key {name} appears in [{table[name]}] and [{section}]")
            table[name] = section
    return table


#: Section of every key: ``{"rank": "network", ...}``.
KEY_SECTIONS: dict[str, str] = _field_table()


def field_info(key: str):
    """The pydantic ``FieldInfo`` of a config key."""
    return SECTIONS[KEY_SECTIONS[key]].model_fields[key]


def is_flag(key: str) -> bool:
    """True when the key holds a boolean (a ``--key/--no-key`` switch on the command line)."""
    return _base_type(field_info(key).annotation) is bool


def is_optional(key: str) -> bool:
    """True when the key may be left unset (``None``)."""
    annotation = field_info(key).annotation
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


def is_list(key: str) -> bool:
    """True when the key holds a list (an option that may be repeated)."""
    return typing.get_origin(_base_type(field_info(key).annotation)) is list


def choices(key: str) -> tuple[str, ...] | None:
    """The allowed values of a key that takes one of a fixed set."""
    base = _base_type(field_info(key).annotation)
    return tuple(typing.get_args(base)) if typing.get_origin(base) is Literal else None


def _base_type(annotation):
    """``int | None`` -> ``int``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
    close += [k for k in known if name.endswith("_" + k) and k not in close]  # networ_rank -> rank
    close = close[:2]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        loc = error["loc"]
        known = list(SECTIONS) if len(loc) == 1 else list(SECTIONS[loc[0]].model_fields)
        return f"{where}: unknown key{_did_you_mean(str(loc[-1]), known)}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    message = message[0].lower() + message[1:]
    shows_input = error["type"] not in ("missing", "model_type", "value_error") and "input" in error
    if shows_input and not isinstance(error["input"], dict):
        message += f" (got {json.dumps(error['input'], default=str)})"
    return f"{where}: {message}"


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
                            f"{_did_you_mean(key, known)}")
    return nested


def _resolve_paths(nested: dict[str, dict[str, Any]], base: Path) -> None:
    """Make the paths written in a config file relative to the file's folder."""
    for section, key in (("data", "data_dir"), ("output", "output_dir")):
        value = nested.get(section, {}).get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            nested[section][key] = str(base / value)
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
            problems.append(f"{key}: unknown key{_did_you_mean(name, list(KEY_SECTIONS))}")
            continue
        nested.setdefault(section, {})[name] = str(value) if isinstance(value, Path) else value
    try:
        config = TrainConfig.model_validate(nested)
    except ValidationError as exc:
        problems += [_describe(e) for e in exc.errors()]
        config = None
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
        for key, info in model.model_fields.items():
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
