"""Bring one module's delta to the rank a rule asks for, and report what was kept.

Low-rank inputs (``up @ down``) go through the exact QR route; dense deltas (TIES, DARE,
extraction) through an exact or randomized SVD. Either way the kept part is the best rank-k
approximation (Eckart–Young) of the given delta, returned as balanced factors.
"""

from __future__ import annotations

import torch

from .lowrank import dense_svd, product_svd
from .rank_rules import RankRule
from .report import ModuleReport


def reduce_factors(up: torch.Tensor, down: torch.Tensor, rule: RankRule, scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    """The best approximation of ``up @ diag(scale) @ down`` allowed by ``rule``, as balanced factors."""
    spectrum = product_svd(up, down, scale)
    keep = rule.choose(spectrum.singular_values)
    new_up, new_down = spectrum.factors(keep)
    return new_up, new_down, ModuleReport(int(down.shape[0]), keep, spectrum.retained(keep), spectrum.error(keep))


def keeps_everything(rule: RankRule | None, rank: int) -> bool:
    """True when ``rule`` cannot cut a delta of this rank (no rule, or a fixed rank at or above it)."""
    return rule is None or (not rule.is_dynamic and rule.value >= rank)


def reduce_dense(matrix: torch.Tensor, rule: RankRule, *, svd: str = "auto", seed: int = 0,
                 input_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    """Balanced rank-k factors of a dense 2-D delta, ``k`` chosen by ``rule``.

    Dynamic rules read the whole spectrum, so they always use the exact SVD.
    """
    wanted = None if rule.is_dynamic else int(rule.value)
    spectrum = dense_svd(matrix, wanted, method="exact" if rule.is_dynamic else svd, seed=seed)
    keep = rule.choose(spectrum.singular_values)
    up, down = spectrum.factors(keep)
    full = min(matrix.shape) if input_rank is None else input_rank
    return up, down, ModuleReport(full, keep, spectrum.retained(keep), spectrum.error(keep))
