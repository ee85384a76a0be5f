"""Turning trained LoRA layers into a saved adapter with kohya's training metadata.

The layers become a :class:`~loralib.adapter.LoraAdapter` (the one representation every format
is written from) whose metadata carries what sd-scripts records — ``ss_learning_rate``,
``ss_num_epochs``, ``ss_steps``, ``ss_tag_frequency``, ``ss_resolution``, … — and Stability's
``modelspec.*`` keys; :mod:`loralib.metadata` adds rank, alpha, architecture and the hashes when
the file is written, atomically.

A DoRA run is written as a PEFT folder (``adapter_config.json`` with ``use_dora``, and the
magnitude vectors beside the factors): the kohya and diffusers writers cannot hold DoRA yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import LoraAdapter, LoraModule
from ..dtypes import storage_dtype
from .config import TrainConfig
from .dataset import BatchPlan, Dataset

if TYPE_CHECKING:
    import torch

    from .blocks import BlockPlan

@dataclass
class RunInfo:
    """Facts about a training run that the metadata records."""

    architecture: str
    base_model: str
    prediction_type: str
    steps: int
    total_steps: int
    epoch: int
    num_epochs: int
    batches_per_epoch: int
    num_processes: int
    session_id: int
    started_at: float
    finished_at: float
    optimizer: str
    validation_images: int = 0
    blocks: BlockPlan | None = None


def adapter_path(config: TrainConfig, suffix: str = "") -> Path:
    """Where the adapter is written: ``<output_dir>/<model_name><suffix>.safetensors`` (a folder for PEFT)."""
    name = config.model.model_name + suffix
    if config.output.output_format == "peft":
        return config.output_dir / f"{name}_peft"
    return config.output_dir / f"{name}.safetensors"


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def training_metadata(config: TrainConfig, dataset: Dataset, plan: BatchPlan, run: RunInfo) -> dict[str, str]:
    """kohya ``ss_*`` and ``modelspec.*`` entries describing how the adapter was trained."""
    data, net, train = config.data, config.network, config.training
    resolution = (data.resolution, data.resolution)
    sizes = [w for w, _ in plan.buckets] + [h for _, h in plan.buckets]
    meta = {
        "ss_session_id": run.session_id,
        "ss_training_started_at": run.started_at,
        "ss_training_finished_at": run.finished_at,
        "ss_sd_model_name": run.base_model,
        "ss_learning_rate": train.learning_rate,
        "ss_unet_lr": train.learning_rate,
        "ss_text_encoder_lr": config.text_encoder_lr if net.train_text_encoder else 0.0,
        "ss_network_train_unet_only": not net.train_text_encoder,
        "ss_network_dropout": net.dropout,
        "ss_num_train_images": dataset.images_per_epoch,
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": run.batches_per_epoch,
        "ss_num_epochs": run.num_epochs,
        "ss_epoch": run.epoch,
        "ss_steps": run.steps,
        "ss_max_train_steps": run.total_steps,
        "ss_lr_warmup_steps": train.lr_warmup_steps,
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_optimizer": run.optimizer,
        "ss_batch_size_per_device": train.batch_size,
        "ss_total_batch_size": train.batch_size * train.gradient_accumulation_steps * run.num_processes,
        "ss_gradient_accumulation_steps": train.gradient_accumulation_steps,
        "ss_gradient_checkpointing": train.gradient_checkpointing,
        "ss_max_grad_norm": train.max_grad_norm if train.max_grad_norm is not None else 0.0,
        "ss_mixed_precision": train.mixed_precision,
        "ss_full_fp16": False,
        "ss_seed": train.seed,
        "ss_noise_offset": train.noise_offset if train.noise_offset else None,
        "ss_multires_noise_iterations": train.multires_noise_iterations or None,
        "ss_multires_noise_discount": train.multires_noise_discount,
        "ss_ip_noise_gamma": train.ip_noise_gamma or None,
        "ss_min_snr_gamma": train.snr_gamma,
        "ss_debiased_estimation": train.debiased_estimation,
        "ss_loss_type": train.loss_type,
        "ss_huber_schedule": train.huber_schedule,
        "ss_huber_c": train.huber_c,
        "ss_huber_scale": train.huber_scale,
        "ss_fp8_base": train.base_weights_dtype != "default",
        "ss_fp8_base_unet": train.base_weights_dtype != "default",
        "ss_v_parameterization": run.prediction_type == "v_prediction",
        "ss_caption_dropout_rate": data.caption_dropout,
        "ss_caption_tag_dropout_rate": data.caption_tag_dropout,
        "ss_shuffle_caption": data.shuffle_caption,
        "ss_keep_tokens": data.keep_tokens,
        "ss_num_validation_images": run.validation_images,
        "ss_validation_split": config.validation.validation_split,
        "ss_validation_seed": config.validation_seed if config.has_validation else None,
        "ss_validate_every_n_steps": config.validation.validate_every_n_steps,
        "ss_validate_every_n_epochs": config.validation.validate_every_n_epochs,
        "ss_clip_skip": None,
        "ss_cache_latents": data.cache_latents and data.crop == "center" and not data.random_flip,
        "ss_flip_aug": data.random_flip,
        "ss_random_crop": data.crop == "random",
        "ss_color_aug": False,
        "ss_resolution": str(resolution),
        "ss_enable_bucket": data.enable_bucket,
        "ss_min_bucket_reso": min(sizes) if data.enable_bucket else None,
        "ss_max_bucket_reso": max(sizes) if data.enable_bucket else None,
        "ss_bucket_info": {"buckets": {f"{w}x{h}": n for (w, h), n in sorted(plan.bucket_counts().items())}},
        "ss_tag_frequency": dataset.tag_frequency(),
        "ss_dataset_dirs": dataset.folders(),
        "ss_prior_loss_weight": 1.0,
        "modelspec.title": config.model.model_name,
        "modelspec.resolution": f"{data.resolution}x{data.resolution}",
        "modelspec.prediction_type": "v" if run.prediction_type == "v_prediction" else "epsilon",
        "modelspec.description": f"LoRA trained with lorareg on {len(dataset.records)} images for {run.steps} steps",
    }
    if data.trigger_word:
        meta["modelspec.trigger_phrase"] = data.trigger_word
    network_args = _network_args(config)
    if network_args:
        meta["ss_network_args"] = network_args
    return {key: _text(value) for key, value in meta.items()}


def _network_args(config: TrainConfig) -> dict[str, str]:
    """kohya's ``network_args`` (all strings) for the settings a plain LoRA lacks."""
    net, train = config.network, config.training
    args = {}
    if net.target_modules == "locon":
        args.update(conv_dim=str(config.conv_rank), conv_alpha=_text(config.conv_alpha))
    for key in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                "mid_lr_weight", "up_lr_weight"):
        if getattr(net, key) is not None:
            args[key] = getattr(net, key)
    if train.loraplus_lr_ratio is not None:
        args["loraplus_lr_ratio"] = _text(train.loraplus_lr_ratio)
    if net.network_type == "dora":
        args["dora_wd"] = "True"  # LyCORIS's name for DoRA
    return args


def build_adapter(modules: dict[str, LoraModule], architecture: str, metadata: dict[str, str]) -> LoraAdapter:
    """The trained modules as an adapter of ``architecture`` carrying ``metadata``."""
    return LoraAdapter(dict(sorted(modules.items())), architecture, "lorareg", dict(metadata))


def save_dora(adapter: LoraAdapter, magnitudes: dict[str, torch.Tensor], path: Path, config: TrainConfig, *,
              operation: dict | None, force: bool = False):
    """Write a DoRA adapter as a PEFT folder: the factors of ``adapter``, each module's magnitude vector,
    ``use_dora`` in every ``adapter_config.json``; atomically, with the training metadata."""
    import json

    from .. import metadata as meta
    from ..files.atomic import atomic_dir, check_output
    from ..files.writer import write_safetensors
    from ..formats import peft
    from ..formats.base import SaveResult
    from ..naming import TE_ROOT

    dtype = storage_dtype(config.output.save_dtype)
    if path.exists() and not path.is_dir():
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError(f"{path} is a file; a PEFT DoRA adapter is a folder", "Remove it or pass --force")
    existing = peft.component_files(path) if path.is_dir() else []
    if existing and not force:
        check_output(existing[0], force=False)
    metadata = meta.build(adapter, title=path.name, operation=operation)
    files, main_hash = [], None
    with atomic_dir(path) as tmp:
        for component in adapter.components:
            tensors, peft_config = peft.component_state(adapter, component, dtype)
            by_path = {_module_path(k): k for k in adapter.modules if k.split(".", 1)[0] == component}
            for name in [n for n in tensors if n.endswith(".lora_A.weight")]:
                module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                magnitude = magnitudes[by_path[module.removeprefix(TE_ROOT + ".")]]
                tensors[name.removesuffix(".lora_A.weight") + ".lora_magnitude_vector"] = \
                    magnitude.to(dtype) if dtype is not None else magnitude
            peft_config["use_dora"] = True
            folder = tmp / peft.relative_folder(component)
            folder.mkdir(exist_ok=True)
            digest = write_safetensors(folder / peft.WEIGHTS_NAME, tensors, {"format": "pt", **metadata},
                                       meta.SELF_HASHES)
            (folder / peft.CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
            files += [path / peft.relative_folder(component) / n for n in (peft.WEIGHTS_NAME, peft.CONFIG_NAME)]
            main_hash = main_hash or digest
    return SaveResult(files[0], "peft", files, main_hash, ["DoRA: saved as a PEFT folder"])


def _module_path(key: str) -> str:
    """The module path of an internal key without its component and the text encoders' ``text_model.``."""
    from ..naming import TE_ROOT

    return key.split(".", 1)[1].removeprefix(TE_ROOT + ".")


def save_trained(adapter: LoraAdapter, path: Path, config: TrainConfig, *, operation: dict | None,
                 force: bool = False):
    """Write ``adapter`` in the configured format and dtype, atomically; returns the SaveResult."""
    dtype = storage_dtype(config.output.save_dtype)
    return adapter.save(path, config.output.output_format, force=force, dtype=dtype, operation=operation)
