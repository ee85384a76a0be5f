"""Turning trained LoRA layers into a saved adapter with kohya's training metadata.

The layers become a :class:`~loralib.adapter.LoraAdapter` (the one representation every format
is written from) whose metadata carries what sd-scripts records — ``ss_learning_rate``,
``ss_num_epochs``, ``ss_steps``, ``ss_tag_frequency``, ``ss_resolution``, … — and Stability's
``modelspec.*`` keys; :mod:`loralib.metadata` adds rank, alpha, architecture and the hashes when
the file is written, atomically.
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
    from ..formats.base import SaveResult
    from ..records import OperationRecord



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
        "ss_min_snr_gamma": train.snr_gamma,
        "ss_v_parameterization": run.prediction_type == "v_prediction",
        "ss_caption_dropout_rate": data.caption_dropout,
        "ss_shuffle_caption": False,
        "ss_keep_tokens": 0,
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
    if net.target_modules == "locon":
        meta["ss_network_args"] = {"conv_dim": str(config.conv_rank), "conv_alpha": _text(config.conv_alpha)}
    return {key: _text(value) for key, value in meta.items()}


def build_adapter(modules: dict[str, LoraModule], architecture: str, metadata: dict[str, str]) -> LoraAdapter:
    """The trained modules as an adapter of ``architecture`` carrying ``metadata``."""
    return LoraAdapter(dict(sorted(modules.items())), architecture, "lorareg", dict(metadata))


def save_trained(adapter: LoraAdapter, path: Path, config: TrainConfig, *, operation: OperationRecord | None,
                 force: bool = False) -> SaveResult:
    """Write ``adapter`` in the configured format and dtype, atomically; returns the SaveResult."""
    from ..formats import save_adapter

    dtype = storage_dtype(config.output.save_dtype)
    return save_adapter(adapter, path, config.output.output_format, force=force, dtype=dtype, operation=operation,
                        inputs=[config.model.base_model])
