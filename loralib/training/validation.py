"""Losses at fixed timesteps and noise: the validation loss and the evaluation loss.

Every image is evaluated alone, center-cropped, with its caption as written (no dropout, no
shuffling) and the LoRA layers in eval mode, at each of a fixed set of timesteps; the noise and the
latent sample of image ``i`` at timestep ``t`` come from a generator seeded with ``(seed, i, t)``.
The same weights therefore always give the same number, and two measurements differ only because
the weights did. Like sd-scripts, the validation timesteps are evenly spaced inside the schedule:
200, 400, 600 and 800 of 1000.
"""

from __future__ import annotations

import hashlib

import torch

VALIDATION_TIMESTEPS = 4


def derive_seed(*parts) -> int:
    """A 63-bit seed for one random stream, fixed by the run seed and the position in the run."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def validation_timesteps(num_train_timesteps: int, count: int = VALIDATION_TIMESTEPS) -> tuple[int, ...]:
    """``count`` timesteps evenly spaced strictly inside ``[0, num_train_timesteps]``."""
    return tuple(round(num_train_timesteps * (i + 1) / (count + 1)) for i in range(count))


def fixed_loss(objective, dataset, plan, timesteps, seed: int) -> float:
    """The mean loss over every image of ``dataset`` and every timestep (the models must be in eval mode)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for index in range(len(dataset.records)):
            batch = objective.evaluation_batch(dataset, plan, index)
            for t in timesteps:
                generator = torch.Generator().manual_seed(derive_seed(seed, index, t))
                loss = objective.loss(batch, generator, torch.tensor([t]), dropout=False)
                total, count = total + float(loss), count + 1
    return total / count
