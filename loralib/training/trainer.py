"""Training a LoRA: diffusers models, peft layers, HF accelerate, exact resume.

:class:`Trainer` checks everything a user can get wrong first (output, data, model), adds peft
LoRA layers (:mod:`.network`), minimises the denoising loss (:mod:`.objective`), writes checkpoints
(:mod:`.checkpoints`), samples (:mod:`.sampling`) and the adapter (:mod:`.export`). It runs through
``accelerate``, so ``accelerate launch -m lorareg train …`` spreads the same run over several
GPUs or machines (batches are sharded over processes; files are written by the main process).

Every random draw of optimizer step N comes from generators seeded with ``(seed, N)``, so a run
resumed from a checkpoint makes exactly the draws the uninterrupted run made: on CPU the final
adapter is bit-for-bit the same. Ctrl-C (SIGINT) finishes the current step, writes a checkpoint
and returns; a second Ctrl-C stops at once. A non-finite loss stops with a :class:`TrainingError`.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from ..records import OperationRecord
from . import checkpoints, network
from .config import TrainConfig
from .dataset import BatchLoader, BatchPlan, BatchSpec, Dataset, scan_dataset
from .export import RunInfo, adapter_path, build_adapter, save_trained, training_metadata

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
    peak_memory_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``lorareg train --json``."""
        return {"output_dir": str(self.output_dir), "adapter": str(self.save.path) if self.save else None,
                "format": self.save.format if self.save else None,
                "hashes": self.save.hashes.to_dict() if self.save else None,
                "steps": self.steps, "total_steps": self.total_steps, "epoch": self.epoch,
                "interrupted": self.interrupted, "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "final_loss": self.losses[-1] if self.losses else None, "samples": [str(p) for p in self.samples],
                "steps_per_second": self.steps_per_second, "peak_memory_bytes": self.peak_memory_bytes,
                "seconds": round(self.seconds, 3)}


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed for one random stream, fixed by the run seed and the position in the run."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
    files. ``dataset`` is the already scanned ``data_dir`` (scanned in :meth:`setup` when not given).
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
        self.samples: list[Path] = []
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
        if self.dataset is None:
            self.dataset = scan_dataset(cfg.data.data_dir, cfg.data.caption_extension,
                                        progress=lambda d, t: self.on_phase("checking images", d, t))
        self.plan = BatchPlan.for_config(self.dataset, cfg)
        self._make_accelerator()
        self._load_models()
        self._add_lora()
        self._make_optimizer()
        if checkpoint is not None:
            self._restore(checkpoint)
        self._prepare()
        self.objective.fill_caches(self.dataset, self.plan, self.on_phase)
        self._ready = True

    def _check_output(self) -> checkpoints.Checkpoint | None:
        cfg = self.config
        checkpoint = None
        if self.resume is not None:
            checkpoint = checkpoints.load_checkpoint(checkpoints.find_checkpoint(self.output_dir, self.resume))
            checkpoints.check_compatible(checkpoint, cfg.flat())
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
        if self.config.training.optimizer == "adamw8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as exc:
                raise InvalidArgumentError(
                    "optimizer adamw8bit needs the bitsandbytes package, which is not installed",
                    "pip install bitsandbytes (needs a GPU), or use optimizer = \"adamw\"") from exc

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
        from .objective import Objective

        self.on_phase("loading the base model", 0, 1)
        self.base = base = load_base_model(self.config.model.base_model)
        self.on_phase("loading the base model", 1, 1)
        vae_dtype = torch.float32 if self.weight_dtype == torch.float16 else self.weight_dtype  # fp16 VAEs overflow
        _place(base.vae.requires_grad_(False).eval(), self.device, vae_dtype)
        _place(base.unet.requires_grad_(False), self.device, self.weight_dtype)
        for encoder in base.text_encoders:
            _place(encoder.requires_grad_(False).eval(), self.device, self.weight_dtype)
        self.objective = Objective(base, self.config, self.device, self.weight_dtype)

    def _add_lora(self) -> None:
        cfg = self.config
        torch.manual_seed(_derive_seed(cfg.training.seed, "init"))  # peft draws the initial down factors
        settings = dict(rank=cfg.network.rank, alpha=cfg.alpha, conv_rank=cfg.conv_rank, conv_alpha=cfg.conv_alpha,
                        dropout=cfg.network.dropout)
        self.targets: dict[str, tuple[Any, dict[str, str]]] = {}
        trained = {"unet": self.base.unet}
        if cfg.network.train_text_encoder:
            trained.update({k: v for k, v in self.base.components().items() if k != "unet"})
        for component, model in trained.items():
            targets = network.target_layers(component, model, cfg.network.target_modules)
            if not targets:
                raise InvalidArgumentError(f"the base model's {component} has no layer that target_modules = "
                                           f"{cfg.network.target_modules!r} selects")
            network.add_lora(model, targets, **settings)
            self.targets[component] = (model, targets)
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()  # LoRA factors train in float32
        if cfg.training.gradient_checkpointing:
            self.base.unet.enable_gradient_checkpointing()
            for component, (model, _) in self.targets.items():
                if component != "unet":
                    model.gradient_checkpointing_enable()
        self.trainable = {name: p for component, (model, _) in self.targets.items()
                          for name, p in network.trainable_parameters(model, component).items()}

    def _make_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        cfg, train = self.config, self.config.training
        groups = []
        for component, (model, _) in self.targets.items():
            params = [p for p in model.parameters() if p.requires_grad]
            lr = train.learning_rate if component == "unet" else cfg.text_encoder_lr
            groups.append({"params": params, "lr": lr})
        if train.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, weight_decay=train.weight_decay)
        elif train.optimizer == "adam":
            self.optimizer = torch.optim.Adam(groups)
        elif train.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, weight_decay=train.weight_decay)
        else:
            import bitsandbytes

            self.optimizer = bitsandbytes.optim.AdamW8bit(groups, weight_decay=train.weight_decay)
        self.steps_per_epoch, self.total_steps, self.num_epochs = self.plan.length(cfg, self.accelerator.num_processes)
        self.lr_scheduler = get_scheduler(train.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=train.lr_warmup_steps, num_training_steps=self.total_steps)

    def _restore(self, checkpoint: checkpoints.Checkpoint) -> None:
        network.load_trainable(self.trainable, checkpoint.trainable)
        self.optimizer.load_state_dict(checkpoint.state["optimizer"])
        self.lr_scheduler.load_state_dict(checkpoint.state["lr_scheduler"])
        self.step = checkpoint.step
        self.losses = list(checkpoint.state.get("losses", []))
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
        self.objective.unet = self.models["unet"]
        self.objective.text_encoders = [self.models.get(name, encoder) for name, encoder in
                                        zip(("text_encoder", "text_encoder_2"), self.base.text_encoders)]
        if getattr(self, "_scaler_state", None) and acc.scaler is not None:
            acc.scaler.load_state_dict(self._scaler_state)
        if acc.is_main_process and self.config.output.tensorboard:
            hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                       for k, v in self.config.flat().items()}
            acc.init_trackers(self.config.model.model_name, config=hparams)

    def evaluation_loss(self, timesteps: tuple[int, ...] = (100, 300, 500, 700, 900), seed: int = 0) -> float:
        """The loss on every image at fixed timesteps and noise, LoRA dropout off: comparable across steps."""
        self.setup()
        for model in self.models.values():
            model.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for index in range(len(self.dataset.records)):
                    batch = self.objective.evaluation_batch(self.dataset, self.plan, index)
                    for t in timesteps:
                        generator = torch.Generator().manual_seed(_derive_seed(seed, index, t))
                        loss = self.objective.loss(batch, generator, torch.tensor([t]), dropout=False)
                        total, count = total + float(loss), count + 1
        finally:
            for model in self.models.values():
                model.train()
        return total / count

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
        dataset = BatchLoader(self.dataset.records, batches, pixels=not self.objective.latent_cache,
                              random_crop=data.crop == "random", flip=data.random_flip)
        workers = 0
        if dataset.pixels:  # decoding and cropping at every step: overlap it with the training step
            cores = os.cpu_count() or 1
            workers = data.num_workers if data.num_workers is not None else (min(4, cores // 2) if cores >= 4 else 0)
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity)

    def _optimizer_step(self, batches: list[dict[str, Any]]) -> tuple[float, float]:
        """One optimizer step over ``batches`` (accumulated); returns its loss and learning rate."""
        acc, cfg = self.accelerator, self.config.training
        learning_rate = self.lr_scheduler.get_last_lr()[0]
        losses = []
        for micro, batch in enumerate(batches):
            seed = _derive_seed(cfg.seed, self.step, micro, acc.process_index)
            torch.manual_seed(seed)  # LoRA dropout draws from the global generator
            generator = torch.Generator().manual_seed(seed)
            loss = self.objective.loss(batch, generator)
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
            if not math.isfinite(value):  # before the optimizer step: the weights stay as they were
                raise TrainingError(
                    f"the loss became {value} at step {self.step + 1} (epoch {self._epoch_of(self.step) + 1}); "
                    "training stopped and nothing more was saved",
                    "Lower learning_rate, use mixed_precision = \"bf16\" or \"no\" instead of fp16, or resume from "
                    "the last good checkpoint with --resume latest")
            losses.append(value)
        if cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(list(self.trainable.values()), cfg.max_grad_norm)
        self.optimizer.step()
        if not getattr(self.optimizer, "step_was_skipped", False):
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses), learning_rate

    def _epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _install_interrupt(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_requested:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self._stop_requested = True

        return signal.signal(signal.SIGINT, handler)

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
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
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
            now = time.perf_counter()
            if timed_from is None:
                timed_from = (self.step, now)  # the first step includes one-off work: time the rest
            speed = (self.step - timed_from[0]) / (now - timed_from[1]) if self.step > timed_from[0] else None
            acc.log({"loss": loss, "lr": lr}, step=self.step)
            self.on_step(StepReport(self.step, self.total_steps, epoch, self.num_epochs, loss, lr, now - began,
                                    speed))
            self._at_step_end(epoch, epoch_done)
            if self._stop_agreed():
                path = self._save_checkpoint()
                return self._result(epoch, interrupted=True, checkpoint=path, speed=speed, began=began)
        return self._finish(began, speed)

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
                     "losses": self.losses, "started_at": self._started_at, "session_id": self._session_id}
            path = checkpoints.save_checkpoint(self.output_dir, self.step, self.trainable, state, self.config.flat(),
                                               keep=self.config.output.checkpoints_total_limit)
        acc.wait_for_everyone()
        return path

    def adapter(self, epoch: int | None = None):
        """The LoRA as trained so far, as a :class:`~loralib.adapter.LoraAdapter` with training metadata."""
        modules = {}
        for _component, (model, targets) in self.targets.items():
            modules.update(network.export_modules(network.lora_layers(model, targets)))
        epoch = epoch if epoch is not None else self._epoch_of(max(self.step - 1, 0)) + 1
        processes = self.accelerator.num_processes
        run = RunInfo(self.base.architecture, str(self.config.model.base_model), self.objective.prediction_type,
                      self.step, self.total_steps, epoch, self.num_epochs,
                      math.ceil(self.plan.batches_per_epoch() / processes), processes, self._session_id,
                      self._started_at, time.time(), self._optimizer_description())
        metadata = training_metadata(self.config, self.dataset, self.plan, run)
        return build_adapter(modules, self.base.architecture, metadata)

    def _optimizer_description(self) -> str:
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        cls = type(optimizer)
        decay = self.config.training.weight_decay
        return f"{cls.__module__}.{cls.__name__}(weight_decay={decay})"

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
            "final_loss": self.losses[-1] if self.losses else None})

    def _finish(self, began: float, speed: float | None) -> TrainResult:
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
                           peak_memory_bytes=_peak_memory(self.device), seconds=time.perf_counter() - began)

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
