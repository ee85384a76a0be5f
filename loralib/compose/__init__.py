"""Composition: merge adapters, resize them, bake them into a base model, extract them from two models,
turn LyCORIS/DoRA adapters into plain LoRA.

``merge([(a, 0.7), (b, 0.3)], rank=32)``, ``resize(a, rank=16)``, ``extract(base, tuned, rank=32)`` and
``to_lora(lokr, rank=32)`` return a :class:`Composition` (``.adapter``, ``.report``, ``.save(path)``);
``bake(base, [(a, 0.8)], output)`` writes a model and returns a :class:`BakeResult`. Every input may
hold any module kind (LoRA, LoHa, LoKr, full and norm differences, DoRA). Low-rank work never forms a dense
``m × n`` delta (the QR route of :mod:`loralib.compose.lowrank`); methods defined on dense deltas
(TIES, DARE, baking, extraction) handle one module at a time.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .baking import BakeResult, bake
    from .extraction import extract
    from .merging import METHODS, merge
    from .plain import to_lora
    from .report import CompositionReport, ModuleReport
    from .resizing import resize
    from .result import Composition

__all__ = ["merge", "resize", "bake", "extract", "to_lora", "Composition", "CompositionReport", "ModuleReport",
           "BakeResult", "METHODS"]
# Imported on first use, so that the torch-free parts (rank_rules) can check arguments first.
_HOMES = {"merge": "merging", "METHODS": "merging", "resize": "resizing", "bake": "baking", "BakeResult": "baking",
          "extract": "extraction", "to_lora": "plain", "Composition": "result", "CompositionReport": "report",
          "ModuleReport": "report"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
