"""How many singular values to keep: a fixed rank, or one of sd-scripts' dynamic rules.

``sv_ratio:N`` keeps every σ_i ≥ σ_max / N; ``sv_fro:F`` keeps the smallest rank whose retained
Frobenius norm ``‖ΔW_k‖_F / ‖ΔW‖_F`` is at least F; ``sv_cumulative:F`` keeps the smallest rank
whose singular values sum to at least F of their total. Applied to the exact spectrum, each rule
picks exactly the rank the spectrum dictates. ``max_rank`` caps any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError
from ..vocabulary import DYNAMIC_RULES

if TYPE_CHECKING:  # the rules are checked without torch (the command line does it first)
    import torch


@dataclass(frozen=True)
class RankRule:
    """A rank choice: ``kind`` is ``fixed`` or a dynamic rule, ``value`` its parameter."""

    kind: str
    value: float
    max_rank: int | None = None

    @property
    def is_dynamic(self) -> bool:
        """True for the rules that read the spectrum."""
        return self.kind != "fixed"

    def describe(self) -> str:
        """``rank 32``, ``sv_fro:0.95 (max rank 64)``."""
        text = f"rank {int(self.value)}" if self.kind == "fixed" else f"{self.kind}:{self.value:g}"
        return text + (f" (max rank {self.max_rank})" if self.max_rank and self.is_dynamic else "")

    def params(self) -> dict:
        """How an operation record describes the rule."""
        params: dict = {"rank_rule": self.describe()}
        if self.is_dynamic:
            params.update(dynamic=f"{self.kind}:{self.value:g}", max_rank=self.max_rank)
        return params

    def choose(self, singular_values: torch.Tensor) -> int:
        """The rank to keep for this descending spectrum (at least 1, at most its length)."""
        s = singular_values.double().flatten()
        available = int(s.numel())
        if available == 0:
            return 0
        if self.kind == "fixed":
            rank = int(self.value)
        elif float(s[0]) <= 0:
            rank = 1
        elif self.kind == "sv_ratio":
            rank = int((s >= s[0] / self.value).sum())
        elif self.kind == "sv_fro":
            squares = s.pow(2)
            rank = _first_reaching(squares.cumsum(0) / squares.sum(), self.value ** 2)
        else:
            rank = _first_reaching(s.cumsum(0) / s.sum(), self.value)
        if self.max_rank is not None:
            rank = min(rank, self.max_rank)
        return max(1, min(rank, available))


def _first_reaching(fractions: torch.Tensor, target: float) -> int:
    """The smallest k with ``fractions[k-1] ≥ target`` (all of them when round-off keeps it short)."""
    import torch

    reached = torch.nonzero(fractions >= target)
    return int(reached[0]) + 1 if reached.numel() else int(fractions.numel())


def parse_dynamic(text: str) -> tuple[str, float]:
    """Parse ``sv_fro:0.95`` into ``("sv_fro", 0.95)``, with a clear error for anything else."""
    name, _, value = text.partition(":")
    name = name.strip().lower()
    if name not in DYNAMIC_RULES or not value:
        raise InvalidArgumentError(f"unknown dynamic rank rule {text!r}",
                                   "Write sv_ratio:N, sv_fro:F or sv_cumulative:F, e.g. sv_fro:0.95")
    try:
        number = float(value)
    except ValueError as exc:
        raise InvalidArgumentError(f"{text!r}: {value!r} is not a number",
                                   "Write sv_ratio:N, sv_fro:F or sv_cumulative:F, e.g. sv_fro:0.95") from exc
    return name, number


def rank_rule(rank: int | None = None, dynamic: str | tuple[str, float] | None = None,
              max_rank: int | None = None) -> RankRule | None:
    """The rule for ``rank`` / ``dynamic`` / ``max_rank`` arguments; None when neither is given."""
    if rank is not None and dynamic is not None:
        raise InvalidArgumentError("give either a rank or a dynamic rule, not both",
                                   "Use --max-rank to cap a dynamic rule")
    if max_rank is not None and (int(max_rank) != max_rank or max_rank < 1):
        raise InvalidArgumentError(f"the maximum rank must be a positive whole number, not {max_rank}")
    if rank is not None:
        if int(rank) != rank or rank < 1:
            raise InvalidArgumentError(f"the rank must be a positive whole number, not {rank}")
        return RankRule("fixed", int(rank))
    if dynamic is None:
        if max_rank is not None:
            return RankRule("fixed", int(max_rank))
        return None
    name, value = parse_dynamic(dynamic) if isinstance(dynamic, str) else dynamic
    if name == "sv_ratio" and not value >= 1:
        raise InvalidArgumentError(f"sv_ratio must be at least 1 (it keeps σ ≥ σ_max / ratio), not {value:g}")
    if name in ("sv_fro", "sv_cumulative") and not 0 < value <= 1:
        raise InvalidArgumentError(f"{name} must be a fraction in (0, 1], not {value:g}", "e.g. sv_fro:0.95")
    return RankRule(name, float(value), None if max_rank is None else int(max_rank))
