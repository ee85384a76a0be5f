"""Turning trained LoRA layers into a saved adapter with kohya's training metadata.

The layers become a :class:`~loralib.adapter.LoraAdapter` (the one representation every format
is written from) whose metadata carries what sd-scripts records — ``ss_learning_rate``,
``ss_num_epochs``, ``ss_steps``, ``ss_tag_frequency``, ``ss_resolution``, … — and Stability's
``modelspec.*`` keys; :mod:`loralib.metadata` adds rank, alpha, architecture and the hashes when
the file is written, atomically.

A LoHa or LoKr run's modules are LyCORIS modules (:mod:`loralib.lycoris.kinds`), written by the kohya
writer with LyCORIS' keys and ``ss_network_module = lycoris.kohya``. A DoRA run's modules are DoRA modules (:class:`~loralib.lycoris.kinds.DoraModule`, what every
reader makes of a DoRA file), written by the kohya writer with LyCORIS' ``dora_scale`` or by the PEFT
writer with ``use_dora`` and ``lora_magnitude_vector``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import LoraAdapter, LoraModule
from ..dtypes import storage_dtype
from .blocks import KIND_KEYS
from .config import TrainConfig
from .dataset import BatchPlan, Dataset

if TYPE_CHECKING:
    from ..formats.base import SaveResult
    from ..lycoris.kinds import DoraModule
    from ..records import OperationRecord
    from .blocks import BlockPlan, TransformerBlocks


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
    blocks: BlockPlan | TransformerBlocks | None = None


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
    if net.train_blocks != "all":  # sd-scripts' Flux.1 network_args
        args["train_blocks"] = net.train_blocks
    for key in ("train_double_block_indices", "train_single_block_indices", *KIND_KEYS["flux"], *KIND_KEYS["sd3"],
                "in_dims"):
        if getattr(net, key) is not None:
            args[key] = str(getattr(net, key))
    if "in_dims" in args:
        args["in_dims"] = f"[{args['in_dims']}]"  # sd-scripts' spelling
    if train.loraplus_lr_ratio is not None:
        args["loraplus_lr_ratio"] = _text(train.loraplus_lr_ratio)
    if net.network_type == "dora":
        args["dora_wd"] = "True"  # LyCORIS's name for DoRA
    if net.network_type in ("loha", "lokr"):  # kohya's network_args for lycoris.kohya
        args["algo"] = net.network_type
        if net.network_type == "lokr":
            args.update(factor=str(net.factor), decompose_both=str(net.decompose_both))
    return args


def build_adapter(modules: dict[str, LoraModule | DoraModule], architecture: str, metadata: dict[str, str]) -> LoraAdapter:
    """The trained modules as an adapter of ``architecture`` carrying ``metadata``."""
    return LoraAdapter(dict(sorted(modules.items())), architecture, "lorareg", dict(metadata))


def save_trained(adapter: LoraAdapter, path: Path, config: TrainConfig, *, operation: OperationRecord | None,
                 force: bool = False) -> SaveResult:
    """Write ``adapter`` in the configured format and dtype, atomically; returns the SaveResult."""
    from ..formats import save_adapter

    dtype = storage_dtype(config.output.save_dtype)
    return save_adapter(adapter, path, config.output.output_format, force=force, dtype=dtype, operation=operation,
                        inputs=[config.model.base_model])
