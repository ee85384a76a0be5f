"""Training LoRA adapters for SD1.x, SD2.x and SDXL with diffusers, peft and accelerate.

::

    from loralib.training import load_config, train
    config = load_config("train.toml", {"rank": 16})
    result = train(config)            # result.save.path: the adapter file

Importing this package is cheap; torch, diffusers and peft load when training starts.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "ConfigError", "load_config", "default_toml", "Trainer", "TrainResult", "StepReport",
           "TrainingError", "train", "scan_dataset", "DatasetError"]


def __getattr__(name: str):
    if name in ("TrainConfig", "ConfigError", "load_config", "default_toml"):
        from . import config

        return getattr(config, name)
    if name in ("scan_dataset", "DatasetError"):
        from . import dataset

        return getattr(dataset, name)
    if name in ("Trainer", "TrainResult", "StepReport", "TrainingError", "train"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'loralib.training' has no attribute {name!r}")
