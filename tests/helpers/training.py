"""Helpers for the training and generation tests: small datasets, configs, and diffusers as the oracle."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DATA = ROOT / "examples" / "data"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture
def one_thread():
    """Run tiny models on one thread: OpenMP's spinning second thread only slows them down on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_dataset(root: Path, count: int = 2) -> Path:
    """The first ``count`` images of the bundled example dataset, in the tutorial layout, under ``root``."""
    (root / "images").mkdir(parents=True)
    (root / "texts").mkdir()
    for image in sorted((EXAMPLE_DATA / "images").glob("*.png"))[:count]:
        shutil.copy(image, root / "images" / image.name)
        shutil.copy(EXAMPLE_DATA / "texts" / f"{image.stem}.txt", root / "texts" / f"{image.stem}.txt")
    return root


def quick_settings(base: Path, data: Path, output: Path, **extra) -> dict:
    """Overrides for a few fast steps on a tiny model (32 px, rank 4, no TensorBoard)."""
    return {"base_model": str(base), "data_dir": str(data), "output_dir": str(output), "model_name": "t",
            "resolution": 32, "rank": 4, "max_train_steps": 4, "learning_rate": 1e-3, "tensorboard": False,
            "save_dtype": "fp32", **extra}


def train_and_evaluate(root: Path, base: Path, images: int, timesteps: tuple[int, ...], **settings) -> dict:
    """Train on ``images`` example images under ``root``, measuring the evaluation loss before and after.

    Runs on one thread (a module-scoped fixture cannot use :func:`one_thread`).
    """
    import torch

    from loralib.training import Trainer, load_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = small_dataset(root / "data", images)
        trainer = Trainer(load_config(None, quick_settings(base, data, root / "out", **settings)))
        trainer.setup()
        before = trainer.evaluation_loss(timesteps=timesteps)
        result = trainer.run()
        after = trainer.evaluation_loss(timesteps=timesteps)
    finally:
        torch.set_num_threads(threads)
    return {"result": result, "before": before, "after": after, "base": base}


def pipeline_class(architecture: str):
    """The diffusers pipeline class of a tiny model."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline


class WarningCatcher(logging.Handler):
    """Collects WARNING-and-above records of the libraries under test."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_with_diffusers(architecture: str, base: Path, lora_file: Path, weight: float = 1.0):
    """Load ``lora_file`` with diffusers' own ``load_lora_weights`` and fuse it.

    Returns ``(pipeline with fused weights, warnings logged while loading, LoRA layers injected,
    adapters listed by get_list_adapters)``.
    """
    from diffusers.utils import logging as diffusers_logging

    pipe = pipeline_class(architecture).from_pretrained(base)
    diffusers_logging.set_verbosity_warning()  # another test may have quietened it
    catcher = WarningCatcher()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(catcher)
    try:
        pipe.load_lora_weights(str(lora_file), adapter_name="trained")
    finally:
        for logger in loggers:
            logger.removeHandler(catcher)
    injected = sum(1 for c in COMPONENTS if getattr(pipe, c, None) is not None
                   for _, m in getattr(pipe, c).named_modules() if hasattr(m, "lora_A") and "trained" in m.lora_A)
    listed = pipe.get_list_adapters()
    pipe.fuse_lora(lora_scale=weight)
    pipe.unload_lora_weights()
    # diffusers notes each text encoder the file does not adapt; that is not a problem with the file
    trained = {c for c, names in listed.items() if "trained" in names}
    messages = [m for m in catcher.messages
                if not any(f"prefix='{c}'" in m and m.startswith("No LoRA keys") for c in COMPONENTS if c not in trained)]
    return pipe, messages, injected, listed
