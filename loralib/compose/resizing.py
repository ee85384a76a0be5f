"""Reduce an adapter's rank: ``resize(adapter, rank=16)`` or ``resize(adapter, dynamic="sv_fro:0.95")``.

Each module is replaced by the best approximation of its ``ΔW`` at the chosen rank, computed
exactly from the factors (:func:`loralib.compose.lowrank.product_svd`; no dense ``m × n`` matrix). A module already at or below a fixed
target rank is kept as it is, bit for bit.
"""

from __future__ import annotations

import torch

from ..adapter import LoraAdapter, LoraModule
from ..errors import InvalidArgumentError
from ..metadata import input_record
from ..records import OperationRecord
from .inputs import AdapterLike, Progress, adapter_name, load, module_from_factors, output_shape, require_computable
from .lowrank import work_dtype
from .parallel import map_modules
from .rank_rules import rank_rule
from .reduce import keeps_everything, reduce_factors
from .report import CompositionReport, ModuleReport
from .result import Composition, storage_bytes


def resize(adapter: AdapterLike, rank: int | None = None, *, dynamic: str | None = None,
           max_rank: int | None = None, dtype: torch.dtype | None = None,
           progress: Progress | None = None) -> Composition:
    """Resize every module to ``rank``, or to the rank a dynamic rule picks (capped by ``max_rank``).

    ``dtype`` is the output's storage dtype (default: the input's). CP-decomposed conv modules
    that are reduced lose their ``mid`` (it is folded into ``down``; ``ΔW`` is what counts).
    """
    rule = rank_rule(rank, dynamic, max_rank)
    if rule is None:
        raise InvalidArgumentError("resize needs a target rank or a dynamic rule",
                                   "Pass --rank N, or --dynamic sv_fro:0.95 (optionally with --max-rank N)")
    source = load(adapter)
    require_computable(source, adapter_name(source, 0))
    dtype = dtype or source.dtype or torch.float32
    report = CompositionReport("resize")

    def resize_one(module: LoraModule) -> tuple[LoraModule, ModuleReport]:
        if keeps_everything(rule, module.rank):
            return module.to(dtype), ModuleReport(module.rank, module.rank)
        up, down = module.factors(work_dtype(module.up, module.down))
        up, down, entry = reduce_factors(up, down, rule, torch.full((module.rank,), module.scale))
        return module_from_factors(up, down, output_shape([module]), dtype), entry

    modules: dict[str, LoraModule] = {}
    for key, (module, entry) in zip(source.modules, map_modules(resize_one, list(source.modules.values()), progress,
                                                                            names=list(source.modules))):
        modules[key], report.modules[key] = module, entry
    unchanged = sum(1 for k, e in report.modules.items() if e.rank == source.modules[k].rank)
    if unchanged:
        report.notes.append(f"{unchanged} of {len(modules)} module(s) kept their rank")
    result = LoraAdapter(modules, source.architecture, source.source_format, dict(source.metadata),
                         dict(source.embeddings))
    report.parameters, report.bytes = result.parameter_count, storage_bytes(result)
    operation = OperationRecord("resize", [input_record(source)], {"rank": rank, "params": rule.params()})
    return Composition(result, report, operation)
