"""TIES and DARE on per-module dense deltas, one module at a time.

Both methods are defined on the full weight deltas ``τ_i = w_i · ΔW_i`` of a layer, not on the
LoRA factors: applying them to ``up`` and ``down`` separately (as peft's ``ties`` combination does)
does not trim, vote on or rescale the entries of ``ΔW`` at all.

- TIES (Yadav et al., 2023): *trim* each ``τ_i`` to its ``density`` fraction of largest-magnitude
  entries, *elect* a sign per entry as the sign of the sum of trimmed values (zero counts as +),
  and take the *disjoint mean*: the average of the trimmed values that agree with that sign.
- DARE (Yu et al., 2023): *drop* each entry of ``τ_i`` with probability ``1 − density`` and
  *rescale* the survivors by ``1 / density`` (the expectation is unchanged), then sum.

The weight multiplies ``ΔW_i`` before anything else, so a negative weight votes with its sign.
DARE's random masks come from a generator seeded by ``(seed, module key, input position)``: the
same seed gives the same result whatever order modules are processed in.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from ..adapter import AdapterModule


def task_vectors(parts: Sequence[tuple[AdapterModule, float]],
                 bases: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """``w_i · ΔW_i`` for each input, as float32 matrices ``[out, in·kh·kw]`` (any module kind; a DoRA
    module needs its layer's base weight in ``bases``)."""
    vectors = []
    for i, (module, weight) in enumerate(parts):
        if module.kind == "lora":
            up, down = module.factors(torch.float32)
            vectors.append((weight * module.scale) * (up @ down))
        else:
            base = bases[i] if bases is not None else None
            vectors.append(weight * module.delta(torch.float32, base).reshape(module.out_features, -1))
    return vectors


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (at least ``int(density·n)``)."""
    count = int(density * delta.numel())
    if count >= delta.numel():
        return delta
    if count <= 0:
        return torch.zeros_like(delta)
    magnitude = delta.abs().flatten()
    threshold = magnitude.kthvalue(magnitude.numel() - count + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties(deltas: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """Trim, elect sign, disjoint mean."""
    trimmed = torch.stack([trim(d, density) for d in deltas])
    elected = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agrees = torch.sign(trimmed) == elected
    total = (trimmed * agrees).sum(dim=0)
    return total / agrees.sum(dim=0).clamp(min=1)


def module_seed(seed: int, key: str, position: int) -> int:
    """A stable per-module, per-input seed derived from the user's seed."""
    return zlib.crc32(f"{seed}:{key}:{position}".encode())


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE on one delta: keep each entry with probability ``density``, divide survivors by it."""
    if density >= 1:
        return delta
    # drawn on the CPU (where the generator is), so that a seed gives the same mask on every device
    keep = torch.bernoulli(torch.full(delta.shape, density, dtype=delta.dtype), generator=generator).to(delta.device)
    return delta * keep / density


def dare(deltas: Sequence[torch.Tensor], density: float, seeds: Sequence[int]) -> torch.Tensor:
    """Drop-and-rescale every delta with its own seeded generator, then sum."""
    total = torch.zeros_like(deltas[0])
    for delta, seed in zip(deltas, seeds):
        total += drop_and_rescale(delta, density, torch.Generator().manual_seed(seed))
    return total
