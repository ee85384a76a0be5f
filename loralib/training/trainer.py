"""Training a LoRA: diffusers models, peft layers, HF accelerate, exact resume.

:class:`Trainer` checks everything a user can get wrong first (output, data, model), adds peft
LoRA layers (:mod:`.network`), minimises the denoising loss (:mod:`.objective`), writes checkpoints
(:mod:`.checkpoints`), samples (:mod:`.sampling`) and the adapter (:mod:`.export`). It runs through
``accelerate``, so ``accelerate launch -m lorareg train …`` spreads the same run over several
GPUs or machines (batches are sharded over processes; files are written by the main process).

Every random draw of optimizer step N comes from generators seeded with ``(seed, N)``, so a run
resumed from a checkpoint makes exactly the draws the uninterrupted run made: on CPU the final
adapter is bit-for-bit the same (the EMA weights, the optimizer state and the validation losses
are checkpointed too). The validation loss (:mod:`.validation`) uses fixed timesteps and noise
from its own generators, so it neither draws from nor disturbs the training streams. Ctrl-C
(SIGINT) or ``kill`` (SIGTERM) finishes the current step, writes a checkpoint and returns; a second
one stops at once. A non-finite loss stops with a :class:`TrainingError`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError, LoraError, OutputExistsError
from ..files.atomic import refuse_input_as_output
from ..records import OperationRecord
from . import checkpoints, network
from .config import TrainConfig
from .dataset import BatchLoader, BatchPlan, BatchSpec, Dataset, scan_configured, training_and_validation
from .export import RunInfo, adapter_path, build_adapter, save_trained, training_metadata
from .validation import derive_seed as _derive_seed

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(LoraError):
    """Training cannot go on (the loss diverged)."""


@dataclass
class StepReport:
    """Where training stands after an optimizer step (passed to ``on_step``)."""

    step: int
    total_steps: int
    epoch: int
    num_epochs: int
    loss: float
    learning_rate: float
    elapsed: float
    steps_per_second: float | None
    validation_loss: float | None = None  # measured after this step (None: not measured at this step)


@dataclass
class TrainResult:
    """What a training run produced."""

    config: TrainConfig
    output_dir: Path
    steps: int
    total_steps: int
    epoch: int
    interrupted: bool
    losses: list[float]
    checkpoint: Path | None = None
    save: Any = None  # SaveResult of the final adapter (None when interrupted)
    adapter: Any = None
    operation: OperationRecord | None = None
    samples: list[Path] = field(default_factory=list)
    dataset: dict[str, Any] = field(default_factory=dict)
    steps_per_second: float | None = None
    median_step_seconds: float | None = None  # the typical step, unaffected by pauses (validation, saving)
    median_step_cpu_seconds: float | None = None  # CPU time of this process per typical step (all its threads)
    peak_memory_bytes: int = 0
    seconds: float = 0.0
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``lorareg train --json``."""
        return {"output_dir": str(self.output_dir), "adapter": str(self.save.path) if self.save else None,
                "format": self.save.format if self.save else None,
                "hashes": self.save.hashes.to_dict() if self.save else None,
                "steps": self.steps, "total_steps": self.total_steps, "epoch": self.epoch,
                "interrupted": self.interrupted, "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "final_loss": self.losses[-1] if self.losses else None, "samples": [str(p) for p in self.samples],
                "steps_per_second": self.steps_per_second, "median_step_seconds": self.median_step_seconds,
                "median_step_cpu_seconds": self.median_step_cpu_seconds,
                "peak_memory_bytes": self.peak_memory_bytes,
                "seconds": round(self.seconds, 3),
                "validation_loss": self.validation_losses[-1][1] if self.validation_losses else None,
                "validation_losses": [list(entry) for entry in self.validation_losses]}


def _seed_dropout(seed: int, device: torch.device) -> None:
    """Seed the global generator of ``device`` (what dropout draws from).

    Cheaper than ``torch.manual_seed``, which also queues seeds for every accelerator type torch
    knows, capturing a stack trace for each: milliseconds per step on a small model.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    elif device.type != "cpu":
        torch.manual_seed(seed)


def _median_gap(stamps: list[float]) -> float | None:
    """The median time between consecutive step ends, the first step (one-off work) left out."""
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps[1:]))
    return gaps[len(gaps) // 2] if gaps else None


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _place(model, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen model to ``device`` and ``dtype`` (no call when it is there already)."""
    parameter = next(model.parameters())
    if parameter.device != device:
        model.to(device)
    if parameter.dtype != dtype:
        model.to(dtype)


def _written_by(adapter: Path, checkpoint: checkpoints.Checkpoint) -> bool:
    """True when ``adapter`` was saved by the run that made ``checkpoint`` (same kohya session id)."""
    from ..inspection import inspect

    try:
        return inspect(adapter, hashes=False).metadata.get("ss_session_id") == str(checkpoint.state.get("session_id"))
    except LoraError:
        return False


def _identity(batch):
    return batch


class Trainer:
    """One training run. ``run()`` does everything; ``setup()`` stops before the first step.

    ``on_step(StepReport)`` is called after every optimizer step; ``on_phase(description, done,
    total)`` reports the preparation (checking images, caching latents and captions, samples).
    ``resume`` is ``"latest"`` or a checkpoint folder; ``force`` starts over where an earlier run left
    files. ``dataset`` is the already scanned ``data_dir`` (scanned in :meth:`setup` when not given); the
    validation images are split from it or scanned from ``validation_dir`` in :meth:`setup`.
    """

    def __init__(self, config: TrainConfig, *, resume: str | Path | None = None, force: bool = False,
                 on_step: Callable[[StepReport], None] | None = None,
                 on_phase: Callable[[str, int, int], None] | None = None, dataset: Dataset | None = None) -> None:
        self.config = config
        self.dataset = dataset
        self.resume = resume
        self.force = force
        self.on_step = on_step or (lambda report: None)
        self.on_phase = on_phase or (lambda description, done, total: None)
        self.step = 0
        self.losses: list[float] = []
        self.validation_losses: list[tuple[int, float]] = []
        self.samples: list[Path] = []
        self.validation: Dataset | None = None
        self.validation_plan: BatchPlan | None = None
        self.ema = None
        self._fused_hooks: list[Any] = []
        self._ready = False
        self._replaces_own_adapter = False
        self._stop_requested = False
        self._started_at = time.time()
        self._session_id = random.randrange(2**31)

    # --- preparation ------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return (what Ctrl-C does)."""
        self._stop_requested = True

    def setup(self) -> None:
        """Check the output, the data and the model, add the LoRA layers, restore a checkpoint, fill caches.

        Every problem a user can fix is raised here, before the first training step.
        """
        if self._ready:
            return
        cfg = self.config
        self.output_dir = cfg.output_dir
        self.final_path = adapter_path(cfg)
        checkpoint = self._check_output()
        self._check_precision()
        progress = lambda d, t: self.on_phase("checking images", d, t)  # noqa: E731
        if self.dataset is None:
            self.dataset = scan_configured(cfg, progress)
        self.dataset, self.validation = training_and_validation(cfg, self.dataset, progress)
        self.plan = BatchPlan.for_config(self.dataset, cfg)
        if self.validation is not None:
            self.validation_plan = BatchPlan.for_config(self.validation, cfg)
        self._make_accelerator()
        self._check_device()
        self._load_models()
        self._add_lora()
        self._make_optimizer()
        if checkpoint is not None:
            self._restore(checkpoint)
        self._prepare()
        sources = [(self.dataset, self.plan)]
        if self.validation is not None:
            sources.append((self.validation, self.validation_plan))
        self.objective.fill_caches(sources, self.on_phase)
        self._ready = True

    def _check_output(self) -> checkpoints.Checkpoint | None:
        cfg = self.config
        checkpoint = None
        if self.resume is not None:
            checkpoint = checkpoints.load_checkpoint(checkpoints.find_checkpoint(self.output_dir, self.resume))
            checkpoints.check_compatible(checkpoint, cfg.flat())
        refuse_input_as_output(self.final_path, [cfg.model.base_model, cfg.data.data_dir])
        if self.final_path.exists() and not self.force:
            # A run extended with --resume may replace the adapter it wrote itself, and nothing else.
            self._replaces_own_adapter = checkpoint is not None and _written_by(self.final_path, checkpoint)
            if not self._replaces_own_adapter:
                raise OutputExistsError(f"{self.final_path} already exists",
                                        "Pass --force to overwrite it, or choose another model_name or output_dir")
        if checkpoint is not None:
            return checkpoint
        if checkpoints.list_checkpoints(self.output_dir) and not self.force:
            raise OutputExistsError(f"{self.output_dir} holds checkpoints of an earlier run",
                                    "Continue it with --resume latest, or pass --force to start over")
        return None

    def _check_precision(self) -> None:
        precision = self.config.training.mixed_precision
        if precision == "fp16" and not torch.cuda.is_available():
            raise InvalidArgumentError("fp16 mixed precision needs a CUDA GPU",
                                       "Use mixed_precision = \"bf16\" or \"no\" on this machine")

    def _check_device(self) -> None:
        train = self.config.training
        if train.base_weights_dtype != "default" and self.device.type != "cuda":
            raise InvalidArgumentError(f"base_weights_dtype = {train.base_weights_dtype} needs a CUDA GPU; this run is "
                                       f"on {self.device.type}", "Use base_weights_dtype = \"default\" here")
        if train.fused_backward_pass and self.accelerator.num_processes > 1:
            raise InvalidArgumentError("fused_backward_pass works in one process only (gradients are averaged "
                                       "across processes after the backward pass)",
                                       "Turn it off to train on several GPUs")

    def _make_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, PartialState

        cfg = self.config
        # Several runs in one process (tests, notebooks) would otherwise inherit the first run's precision.
        if PartialState._shared_state and PartialState().num_processes == 1:
            AcceleratorState._reset_state(reset_partial_state=True)
        log_with = "tensorboard" if cfg.output.tensorboard else None
        # Without a GPU, say so: accelerate then joins a torchrun/mpirun launch as one of several CPU processes.
        on_cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
        self.accelerator = Accelerator(mixed_precision=cfg.training.mixed_precision, log_with=log_with,
                                       project_dir=str(self.output_dir / "runs"), cpu=on_cpu)
        self.device = self.accelerator.device
        self.weight_dtype = WEIGHT_DTYPES[cfg.training.mixed_precision]

    def _load_models(self) -> None:
        from ..pipelines import load_base_model
        from .objective import make_objective

        self.on_phase("loading the base model", 0, 1)
        self.base = base = load_base_model(self.config.model.base_model,
                                                     components=self.config.model.base_components)
        self.on_phase("loading the base model", 1, 1)
        if not self.config.sampling.sample_prompts:  # training only encodes: the decoder is dead weight
            base.vae.decoder = base.vae.post_quant_conv = None
        vae_dtype = torch.float32 if self.weight_dtype == torch.float16 else self.weight_dtype  # fp16 VAEs overflow
        _place(base.vae.requires_grad_(False).eval(), self.device, vae_dtype)
        _place(base.denoiser.requires_grad_(False), self.device, self.weight_dtype)
        for encoder in base.text_encoders:
            _place(encoder.requires_grad_(False).eval(), self.device, self.weight_dtype)
        self.objective = make_objective(base, self.config, self.device, self.weight_dtype)

    def _refuse_unsaveable_kind(self) -> None:
        """Refuse, before any step, a network the output could not hold: kohya and ComfyUI names fuse
        Flux.1/SD3 layers, which only plain LoRA factors can be stored in, and LoHa/LoKr are trained
        for the SD UNets and text encoders only."""
        kind, fmt = self.config.network.network_type, self.config.output.output_format
        if self.base.family == "sd" or kind == "lora":
            return
        if kind in ("loha", "lokr") or fmt in ("kohya", "comfyui"):
            raise InvalidArgumentError(
                f"network_type = \"{kind}\" cannot be trained for {self.base.architecture} into {fmt} format: its "
                "fused layers hold plain LoRA factors only" if kind == "dora" else
                f"network_type = \"{kind}\" is trained for SD1.x, SD2.x and SDXL only, not {self.base.architecture}",
                "Use network_type = \"lora\"" + (" (or DoRA with output_format = \"peft\")" if kind == "dora" else ""))

    def _add_lora(self) -> None:
        from .blocks import plan_blocks

        cfg = self.config
        self._refuse_unsaveable_kind()
        torch.manual_seed(_derive_seed(cfg.training.seed, "init"))  # the initial factors are drawn
        self.blocks = plan_blocks(cfg, self.base.architecture)
        self.targets: dict[str, tuple[Any, dict[str, str]]] = {}
        self.denoiser_name = denoiser = self.base.denoiser_name  # unet, or Flux.1/SD3's transformer
        trained = {denoiser: self.base.denoiser}
        if cfg.network.train_text_encoder:
            trained.update({k: v for k, v in self.base.components().items() if k != denoiser})
        for component, model in trained.items():
            adds = getattr(self.blocks, "adds", None) if component == denoiser else None
            targets = network.target_layers(component, model, cfg.network.target_modules, adds)
            settings = network.layer_settings(model, targets, rank=cfg.network.rank, alpha=cfg.alpha,
                                              conv_rank=cfg.conv_rank, conv_alpha=cfg.conv_alpha,
                                              blocks=self.blocks if component == denoiser else None)
            if not settings:
                raise InvalidArgumentError(f"the base model's {component} has no layer that target_modules = "
                                           f"{cfg.network.target_modules!r} (and the block settings) select")
            network.add_network(model, settings, cfg.network.network_type, dropout=cfg.network.dropout,
                                factor=cfg.network.factor, decompose_both=cfg.network.decompose_both)
            self.targets[component] = (model, {name: targets[name] for name in settings})
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()  # LoRA factors train in float32
        if cfg.training.gradient_checkpointing:
            self.base.denoiser.enable_gradient_checkpointing()
            for component, (model, _) in self.targets.items():
                if component != denoiser:
                    model.gradient_checkpointing_enable()
        if cfg.training.base_weights_dtype != "default":
            from .fp8 import FP8_DTYPES, store_in_fp8

            for model, _ in self.targets.values():
                store_in_fp8(model, FP8_DTYPES[cfg.training.base_weights_dtype], self.weight_dtype)
        self.trainable = {name: p for component, (model, _) in self.targets.items()
                          for name, p in network.trainable_parameters(model, component).items()}
        if cfg.training.ema_decay is not None:
            from .ema import EMA

            self.ema = EMA(self.trainable, cfg.training.ema_decay, on_cpu=cfg.training.ema_on_cpu)

    def _make_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        from .optimizers import build_optimizer, install_fused_backward, parameter_groups

        cfg, train = self.config, self.config.training
        trainable = {component: {name: p for name, p in model.named_parameters() if p.requires_grad}
                     for component, (model, _) in self.targets.items()}
        groups = parameter_groups(trainable, cfg, self._lr_weight if self.blocks is not None else None)
        self.optimizer, self._optimizer_text = build_optimizer(groups, cfg, self.device)
        if train.fused_backward_pass:
            self._fused_hooks = install_fused_backward(self.optimizer, train.max_grad_norm)
        self.steps_per_epoch, self.total_steps, self.num_epochs = self.plan.length(cfg, self.accelerator.num_processes)
        self.lr_scheduler = get_scheduler(train.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=train.lr_warmup_steps, num_training_steps=self.total_steps)

    def _lr_weight(self, component: str, path: str) -> float:
        """The block learning-rate factor of a trainable parameter (``….to_q.lora_A.default.weight``)."""
        if component != self.denoiser_name:
            return 1.0
        key = self.targets[component][1].get(network.layer_path(path))
        return self.blocks.lr_weight(key) if key is not None else 1.0

    def _current_lr(self) -> float:
        """The UNet's learning rate now: ``learning_rate`` times the schedule's factor."""
        scheduler = self.lr_scheduler
        factor = scheduler.get_last_lr()[0] / scheduler.base_lrs[0] if scheduler.base_lrs[0] else 0.0
        return self.config.training.learning_rate * factor

    def _restore(self, checkpoint: checkpoints.Checkpoint) -> None:
        network.load_trainable(self.trainable, checkpoint.trainable)
        self.optimizer.load_state_dict(checkpoint.state["optimizer"])
        self.lr_scheduler.load_state_dict(checkpoint.state["lr_scheduler"])
        self.step = checkpoint.step
        self.losses = list(checkpoint.state.get("losses", []))
        self.validation_losses = [tuple(entry) for entry in checkpoint.state.get("validation_losses", [])]
        if self.ema is not None:
            if checkpoint.ema is None:
                from ..errors import MismatchError

                raise MismatchError("the checkpoint was made without EMA (ema_decay), so the average cannot go on",
                                    "Resume without ema_decay, or start over with --force")
            self.ema.load_state_dict(checkpoint.ema)
        self._started_at = checkpoint.state.get("started_at", self._started_at)
        self._session_id = checkpoint.state.get("session_id", self._session_id)
        self._scaler_state = checkpoint.state.get("scaler")
        if self.step >= self.total_steps:
            raise InvalidArgumentError(f"the checkpoint is at step {self.step}, and this configuration trains "
                                       f"{self.total_steps} steps", "Raise num_epochs or max_train_steps to train on")

    def _prepare(self) -> None:
        acc = self.accelerator
        prepared = acc.prepare(*[model for model, _ in self.targets.values()], self.optimizer)
        *models, self.optimizer = prepared
        self.models = dict(zip(self.targets, models))
        self.objective.unet = self.models[self.denoiser_name]
        self.objective.text_encoders = [self.models.get(name, encoder) for name, encoder in
                                        zip(("text_encoder", "text_encoder_2", "text_encoder_3"),
                                            self.base.text_encoders)]
        if getattr(self, "_scaler_state", None) and acc.scaler is not None:
            acc.scaler.load_state_dict(self._scaler_state)
        if acc.is_main_process and self.config.output.tensorboard:
            hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                       for k, v in self.config.flat().items()}
            acc.init_trackers(self.config.model.model_name, config=hparams)

    def evaluation_loss(self, timesteps: tuple[int, ...] = (100, 300, 500, 700, 900), seed: int = 0) -> float:
        """The loss on every training image at fixed timesteps and noise, LoRA dropout off: comparable
        across steps."""
        self.setup()
        return self._fixed_loss(self.dataset, self.plan, timesteps, seed)

    def validation_loss(self) -> float:
        """The loss on the validation images at fixed timesteps and noise (see :mod:`.validation`)."""
        from .validation import validation_timesteps

        self.setup()
        if self.validation is None:
            raise InvalidArgumentError("there are no validation images", "Set validation_split or validation_dir")
        steps = validation_timesteps(self.objective.noise_scheduler.config.num_train_timesteps)
        return self._fixed_loss(self.validation, self.validation_plan, steps, self.config.validation_seed)

    def _fixed_loss(self, dataset: Dataset, plan: BatchPlan, timesteps, seed: int) -> float:
        from .validation import fixed_loss

        for model in self.models.values():
            model.eval()
        try:
            return fixed_loss(self.objective, dataset, plan, timesteps, seed)
        finally:
            for model in self.models.values():
                model.train()

    # --- the loop -------------------------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int) -> list[BatchSpec]:
        batches = self.plan.epoch(epoch)
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        if processes == 1:
            return batches
        per_process = math.ceil(len(batches) / processes)
        padded = batches + batches[:per_process * processes - len(batches)]
        return padded[rank::processes]

    def _loader(self, batches: list[BatchSpec]):
        from torch.utils.data import DataLoader

        data = self.config.data
        dataset = BatchLoader(self.dataset.records, batches, pixels=not self.objective.caches_latents,
                              random_crop=data.crop == "random", flip=data.random_flip, masks=data.masked_loss)
        workers = 0
        if dataset.pixels:  # decoding and cropping at every step: overlap it with the training step
            cores = os.cpu_count() or 1
            workers = data.num_workers if data.num_workers is not None else (min(4, cores // 2) if cores >= 4 else 0)
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity)

    def _optimizer_step(self, batches: list[dict[str, Any]]) -> tuple[float, float]:
        """One optimizer step over ``batches`` (accumulated); returns its loss and learning rate."""
        acc, cfg = self.accelerator, self.config.training
        learning_rate = self._current_lr()
        fused = bool(self._fused_hooks)
        losses = []
        for micro, batch in enumerate(batches):
            seed = _derive_seed(cfg.seed, self.step, micro, acc.process_index)
            _seed_dropout(seed, self.device)  # LoRA dropout draws from the global generator
            generator = torch.Generator().manual_seed(seed)
            loss = self.objective.loss(batch, generator)
            if fused:  # the fused backward pass changes the weights: check the loss before it
                self._check_finite(float(loss.detach()))
            last = micro == len(batches) - 1
            with contextlib.ExitStack() as stack:
                if not last and acc.num_processes > 1:
                    for model in self.models.values():
                        stack.enter_context(acc.no_sync(model))
                acc.backward(loss / len(batches))
            # read the loss only now, so the backward pass is queued without waiting for the forward one
            value = float(loss.detach())
            if acc.num_processes > 1:
                value = float(acc.gather(loss.detach().reshape(1)).mean())
            self._check_finite(value)  # before the optimizer step: the weights stay as they were
            losses.append(value)
        if not fused:
            if cfg.max_grad_norm is not None:
                acc.clip_grad_norm_(list(self.trainable.values()), cfg.max_grad_norm)
            self.optimizer.step()
        if not getattr(self.optimizer, "step_was_skipped", False):
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses), learning_rate

    def _check_finite(self, value: float) -> None:
        if not math.isfinite(value):
            raise TrainingError(
                f"the loss became {value} at step {self.step + 1} (epoch {self._epoch_of(self.step) + 1}); "
                "training stopped and nothing more was saved",
                "Lower learning_rate, use mixed_precision = \"bf16\" or \"no\" instead of fp16, or resume from "
                "the last good checkpoint with --resume latest")

    def _epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _install_interrupt(self):
        """Ctrl-C (SIGINT) and ``kill`` (SIGTERM) finish the step and save a checkpoint; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_requested:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self._stop_requested = True

        return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _stop_agreed(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self._stop_requested
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def run(self) -> TrainResult:
        """Train to the configured number of steps (or until stopped) and save the adapter."""
        self.setup()
        if self.accelerator.is_main_process:
            if self.resume is None and checkpoints.list_checkpoints(self.output_dir):  # --force: start over
                import shutil

                shutil.rmtree(checkpoints.checkpoints_dir(self.output_dir))
            self.output_dir.mkdir(parents=True, exist_ok=True)
        previous = self._install_interrupt()
        try:
            return self._loop()
        finally:
            for signum, handler in (previous or {}).items():
                signal.signal(signum, handler)
            self.accelerator.end_training()

    def _schedule(self) -> list[tuple[int, bool, list[BatchSpec]]]:
        """The remaining optimizer steps as ``(epoch, whether it ends the epoch, its batches)``."""
        accumulation = self.config.training.gradient_accumulation_steps
        remaining = self.total_steps - self.step
        epoch = self._epoch_of(self.step)
        first = self.step - epoch * self.steps_per_epoch
        steps: list[tuple[int, bool, list[BatchSpec]]] = []
        while len(steps) < remaining:
            batches = self._epoch_batches(epoch)
            chunks = [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]
            for position in range(first, len(chunks)):
                steps.append((epoch + 1, position == len(chunks) - 1, chunks[position]))
                if len(steps) == remaining:
                    break
            epoch, first = epoch + 1, 0
        return steps

    def _loop(self) -> TrainResult:
        acc = self.accelerator
        began = time.perf_counter()
        timed_from: tuple[int, float] | None = None
        speed = None
        self._step_ends: list[float] = []
        self._step_cpu_ends: list[float] = []
        for model in self.models.values():
            model.train()
        schedule = self._schedule()
        # One loader for the whole run, so worker processes start once, not at every epoch.
        loader = iter(self._loader([spec for _, _, chunk in schedule for spec in chunk]))
        epoch = self._epoch_of(self.step) + 1
        for epoch, epoch_done, chunk in schedule:
            loss, lr = self._optimizer_step([next(loader) for _ in chunk])
            self.step += 1
            self.losses.append(loss)
            if self.ema is not None:
                self.ema.update(self.step)
            validation = self._validate_if_due(epoch, epoch_done)
            now = time.perf_counter()
            self._step_ends.append(now)
            self._step_cpu_ends.append(time.process_time())
            if timed_from is None:
                timed_from = (self.step, now)  # the first step includes one-off work: time the rest
            speed = (self.step - timed_from[0]) / (now - timed_from[1]) if self.step > timed_from[0] else None
            acc.log(self._logs(loss, lr, validation), step=self.step)
            self.on_step(StepReport(self.step, self.total_steps, epoch, self.num_epochs, loss, lr, now - began,
                                    speed, validation))
            self._at_step_end(epoch, epoch_done)
            if self._stop_agreed():
                path = self._save_checkpoint()
                return self._result(epoch, interrupted=True, checkpoint=path, speed=speed, began=began)
        return self._finish(began, speed)

    def _logs(self, loss: float, lr: float, validation: float | None) -> dict[str, float]:
        logs = {"loss": loss, "lr": lr}
        if validation is not None:
            logs["val_loss"] = validation
        d = self.optimizer.param_groups[0].get("d")  # Prodigy's step-size estimate
        if isinstance(d, (int, float)):
            logs["d"] = float(d)
        return logs

    def _validate_if_due(self, epoch: int, epoch_done: bool) -> float | None:
        """Measure the validation loss when the configuration asks for it after this step (and at the end)."""
        if self.validation is None:
            return None
        val = self.config.validation
        by_step = val.validate_every_n_steps and self.step % val.validate_every_n_steps == 0
        every_epochs = val.validate_every_n_epochs or (None if val.validate_every_n_steps else 1)
        by_epoch = epoch_done and every_epochs and epoch % every_epochs == 0
        if not (by_step or by_epoch or self.step >= self.total_steps):
            return None
        loss = self.validation_loss()
        self.validation_losses.append((self.step, loss))
        return loss

    def _at_step_end(self, epoch: int, epoch_done: bool) -> None:
        out, sampling = self.config.output, self.config.sampling
        final = self.step >= self.total_steps
        by_epoch = epoch_done and out.save_every_n_epochs and epoch % out.save_every_n_epochs == 0
        by_step = out.save_every_n_steps and self.step % out.save_every_n_steps == 0
        if (by_epoch or by_step) and not final:
            suffix = f"-{epoch:06d}" if by_epoch else f"-step{self.step:08d}"
            self._save_checkpoint()
            self._export(adapter_path(self.config, suffix), epoch, operation=None, force=True)
        sample_epoch = epoch_done and sampling.sample_every_n_epochs and epoch % sampling.sample_every_n_epochs == 0
        sample_step = sampling.sample_every_n_steps and self.step % sampling.sample_every_n_steps == 0
        if sampling.sample_prompts and (sample_epoch or sample_step or final):
            self._render_samples()

    # --- saving ---------------------------------------------------------------------------------------------

    def _save_checkpoint(self) -> Path | None:
        acc = self.accelerator
        path = None
        if acc.is_main_process:
            state = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "losses": self.losses, "started_at": self._started_at, "session_id": self._session_id,
                     "validation_losses": [list(entry) for entry in self.validation_losses]}
            path = checkpoints.save_checkpoint(self.output_dir, self.step, self.trainable, state, self.config.flat(),
                                               keep=self.config.output.checkpoints_total_limit,
                                               ema=self.ema.state_dict() if self.ema is not None else None)
        acc.wait_for_everyone()
        return path

    def adapter(self, epoch: int | None = None):
        """The LoRA as trained so far (the EMA weights with ``ema_decay`` and ``save_ema``), as a
        :class:`~loralib.adapter.LoraAdapter` with training metadata."""
        with self._saved_weights():
            modules = {}
            for model, targets in self.targets.values():
                modules.update(network.export_modules(network.trained_layers(model, targets)))
        epoch = epoch if epoch is not None else self._epoch_of(max(self.step - 1, 0)) + 1
        processes = self.accelerator.num_processes
        run = RunInfo(self.base.architecture, str(self.config.model.base_model), self.objective.prediction_type,
                      self.step, self.total_steps, epoch, self.num_epochs,
                      math.ceil(self.plan.batches_per_epoch() / processes), processes, self._session_id,
                      self._started_at, time.time(), self._optimizer_text,
                      len(self.validation.records) if self.validation is not None else 0, self.blocks)
        metadata = training_metadata(self.config, self.dataset, self.plan, run)
        return build_adapter(modules, self.base.architecture, metadata)

    def _saved_weights(self):
        """A context in which the live layers hold the weights that are saved (EMA when asked)."""
        if self.ema is not None and self.config.training.save_ema:
            return self.ema.swapped_in()
        return contextlib.nullcontext()

    def _export(self, path: Path, epoch: int, operation: OperationRecord | None, force: bool):
        adapter = result = None
        if self.accelerator.is_main_process:
            adapter = self.adapter(epoch)
            result = save_trained(adapter, path, self.config, operation=operation, force=force)
        self.accelerator.wait_for_everyone()
        return adapter, result

    def operation(self) -> OperationRecord:
        """The history record of this run (written into the file and given to the catalog)."""
        return OperationRecord("train", [], {
            "params": self.config.flat(), "dataset": self.dataset.summary(self.plan.bucket_counts()),
            "base_model": str(self.config.model.base_model), "architecture": self.base.architecture,
            "steps": self.step, "epochs": self._epoch_of(max(self.step - 1, 0)) + 1,
            "final_loss": self.losses[-1] if self.losses else None,
            "final_validation_loss": self.validation_losses[-1][1] if self.validation_losses else None})

    def _finish(self, began: float, speed: float | None) -> TrainResult:
        from ..files.pages import return_freed_memory

        return_freed_memory()  # what the steps freed, so that saving does not raise the peak above theirs
        epoch = self._epoch_of(max(self.step - 1, 0)) + 1
        operation = self.operation()
        replace = self.force or self._replaces_own_adapter
        adapter, save = self._export(self.final_path, epoch, operation, force=replace)
        checkpoint = self._save_checkpoint()
        result = self._result(epoch, interrupted=False, checkpoint=checkpoint, speed=speed, began=began)
        result.save, result.operation, result.adapter = save, operation, adapter
        return result

    def _result(self, epoch: int, *, interrupted: bool, checkpoint: Path | None, speed: float | None,
                began: float) -> TrainResult:
        return TrainResult(self.config, self.output_dir, self.step, self.total_steps, epoch, interrupted,
                           list(self.losses), checkpoint, samples=list(self.samples),
                           dataset=self.dataset.summary(self.plan.bucket_counts()), steps_per_second=speed,
                           peak_memory_bytes=_peak_memory(self.device), seconds=time.perf_counter() - began,
                           validation_losses=list(self.validation_losses),
                           median_step_seconds=_median_gap(getattr(self, "_step_ends", [])),
                           median_step_cpu_seconds=_median_gap(getattr(self, "_step_cpu_ends", [])))

    # --- samples ----------------------------------------------------------------------------------------------

    def _base_hash(self) -> str | None:
        """The base model's A1111 ``Model hash`` (computed once, for the samples)."""
        if not hasattr(self, "_model_hash"):
            from ..generation import model_hash

            self._model_hash = model_hash(self.config.model.base_model)
        return self._model_hash

    def _render_samples(self) -> None:
        from .sampling import render_samples

        acc = self.accelerator
        if acc.is_main_process:
            for model in self.models.values():
                model.eval()
            rng_state = torch.get_rng_state()
            try:
                with acc.autocast():
                    written = render_samples(
                        self.base, acc.unwrap_model(self.objective.unet),
                        [acc.unwrap_model(e) for e in self.objective.text_encoders], self.config, self.step,
                        self.output_dir / "samples", lambda d, t: self.on_phase("rendering samples", d, t),
                        model_hash=self._base_hash())
            finally:
                torch.set_rng_state(rng_state)
                for model in self.models.values():
                    model.train()
            self.samples += [path for path, _ in written]
            if self.config.output.tensorboard:
                import numpy as np

                writer = acc.get_tracker("tensorboard", unwrap=True)
                for index, (_, image) in enumerate(written):
                    writer.add_images(f"samples/{index:02d}", np.asarray(image)[None], global_step=self.step,
                                      dataformats="NHWC")
        acc.wait_for_everyone()


def train(config: TrainConfig, *, resume: str | Path | None = None, force: bool = False,
          on_step: Callable[[StepReport], None] | None = None,
          on_phase: Callable[[str, int, int], None] | None = None) -> TrainResult:
    """Train a LoRA as ``config`` says and save it; see :class:`Trainer`."""
    return Trainer(config, resume=resume, force=force, on_step=on_step, on_phase=on_phase).run()
