"""What a composition did to each module: output rank, retained energy, error against its target.

Retained energy is ``‖ΔW_k‖_F / ‖ΔW‖_F`` where ``ΔW`` is what the method asked for (the exact
weighted sum, or the TIES/DARE result) and ``ΔW_k`` what was written; after an SVD truncation it
comes exactly from the singular values. ``error`` is ``‖ΔW_k − ΔW‖_F / ‖ΔW‖_F``.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ModuleReport:
    """One module of a composition's output."""

    input_rank: int  # rank of the exact result before any truncation (sum of input ranks for a merge)
    rank: int
    retained: float = 1.0
    error: float = 0.0


@dataclass
class CompositionReport:
    """Per-module results of a merge, resize or extraction, and notes for the user."""

    operation: str
    modules: dict[str, ModuleReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    parameters: int = 0
    bytes: int = 0

    @property
    def ranks(self) -> dict[int, int]:
        """How many output modules have each rank, ascending."""
        return dict(sorted(Counter(m.rank for m in self.modules.values()).items()))

    def retained_summary(self) -> dict[str, float] | None:
        """min / median / max retained energy over modules (None without modules)."""
        values = [m.retained for m in self.modules.values()]
        if not values:
            return None
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    @property
    def max_error(self) -> float:
        """The largest relative error of any module against its target."""
        return max((m.error for m in self.modules.values()), default=0.0)

    @property
    def worst_module(self) -> str | None:
        """The module with the least retained energy."""
        return min(self.modules, key=lambda k: self.modules[k].retained, default=None)

    def to_dict(self, modules: bool = True) -> dict:
        """A JSON-ready summary (with every module when ``modules``)."""
        data = {"operation": self.operation, "module_count": len(self.modules),
                "ranks": {str(k): v for k, v in self.ranks.items()},
                "retained": self.retained_summary(), "max_error": self.max_error,
                "worst_module": self.worst_module, "parameters": self.parameters, "bytes": self.bytes,
                "notes": list(self.notes)}
        if modules:
            data["modules"] = {k: vars(m).copy() for k, m in self.modules.items()}
        return data
