"""Reduce an adapter's rank: ``resize(adapter, rank=16)`` or ``resize(adapter, dynamic="sv_fro:0.95")``.

Each module is replaced by the best approximation of its ``ΔW`` at the chosen rank, computed
exactly from the factors (:func:`loralib.compose.lowrank.product_svd`; no dense ``m × n`` matrix).
A LoRA module already at or below a fixed target rank is kept as it is, bit for bit. LyCORIS and
DoRA modules become plain LoRA modules the same way :func:`loralib.compose.plain.to_lora` makes
them (DoRA needs ``base``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapter import LoraAdapter
from ..device import resolve_device
from ..errors import InvalidArgumentError
from ..metadata import input_record
from ..records import OperationRecord
from .base_layers import BaseLayers, needing_base
from .inputs import AdapterLike, FiniteCheck, Progress, adapter_name, load, require_computable
from .plain import plain_modules
from .rank_rules import rank_rule
from .report import CompositionReport
from .result import Composition, storage_bytes


def resize(adapter: AdapterLike, rank: int | None = None, *, dynamic: str | None = None,
           max_rank: int | None = None, dtype: torch.dtype | None = None, base: str | Path | None = None,
           progress: Progress | None = None, device: str | torch.device | None = "auto") -> Composition:
    """Resize every module to ``rank``, or to the rank a dynamic rule picks (capped by ``max_rank``).

    ``dtype`` is the output's storage dtype (default: the input's). CP-decomposed conv modules
    that are reduced lose their ``mid`` (it is folded into ``down``; ``ΔW`` is what counts).
    ``base`` is the base model, needed only for DoRA modules. ``device`` (``auto``, ``cpu``,
    ``cuda``) is where each module is computed (see :mod:`loralib.device`).
    """
    rule = rank_rule(rank, dynamic, max_rank)
    if rule is None:
        raise InvalidArgumentError("resize needs a target rank or a dynamic rule",
                                   "Pass --rank N, or --dynamic sv_fro:0.95 (optionally with --max-rank N)")
    device = resolve_device(device)
    source = load(adapter)
    require_computable(source, adapter_name(source, 0), values=False)
    check = FiniteCheck([(adapter_name(source, 0), source)])  # as each module is computed
    dtype = dtype or source.dtype or torch.float32
    report = CompositionReport("resize")
    name = source.source_path.name if source.source_path else "the adapter"
    with BaseLayers.open(base, needing_base([(name, source.modules)])) as layers:
        modules = plain_modules(source, rule, layers, report, dtype=dtype, progress=progress, device=device,
                                check=check)
    check.raise_if_failed()
    unchanged = sum(1 for k, e in report.modules.items()
                    if source.modules[k].kind == "lora" and e.rank == source.modules[k].rank)
    if unchanged:
        report.notes.append(f"{unchanged} of {len(modules)} module(s) kept their rank")
    result = LoraAdapter(modules, source.architecture, source.source_format, dict(source.metadata),
                         dict(source.embeddings))
    report.parameters, report.bytes = result.parameter_count, storage_bytes(result)
    operation = OperationRecord("resize", [input_record(source)], {"rank": rank, "params": rule.params()})
    return Composition(result, report, operation)
