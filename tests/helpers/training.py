"""Helpers for the training and generation tests: small datasets and quick configs."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_DATA = ROOT / "examples" / "data"


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
