"""Turn any adapter into a plain LoRA: ``to_lora(lokr_adapter, rank=32)``, or exactly with no rank.

Every module that changes a weight matrix becomes LoRA factors (:func:`loralib.compose.spectra.lora_factors`):

- without a rank or rule, exactly: LoRA modules as they are, LoHa and LoKr by their exact low-rank
  forms (face-splitting and Kronecker factors), full-rank differences and DoRA by a full-rank SVD
  (exact up to rounding);
- with ``rank`` or ``dynamic``, optimally (Eckart–Young): the best approximation of each module's
  ``ΔW`` at that rank, from the exact spectrum where the structure gives it (LoRA and LoHa by the
  QR route, LoKr from its two small factors' SVDs) and from an exact or randomized dense SVD for
  full-rank differences and DoRA.

DoRA's ``ΔW`` depends on the base model (``base``); the result reproduces it on that model only.
Norm-layer and bias differences are not weight matrices and no LoRA holds them: they are left out,
and the report says so. The report gives each module's retained energy and error.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from ..adapter import LoraAdapter, LoraModule
from ..device import on_device, resolve_device, workers_for
from ..errors import InvalidArgumentError
from ..layers import LayerShape
from ..lycoris import KIND_TITLES
from ..metadata import input_record
from ..records import OperationRecord
from .base_layers import BaseLayers, needing_base
from .inputs import AdapterLike, FiniteCheck, Progress, load, module_from_factors
from .lowrank import SVD_METHODS, work_dtype
from .parallel import map_modules
from .rank_rules import RankRule, rank_rule
from .reduce import keeps_everything, reduce_factors
from .report import CompositionReport, ModuleReport
from .result import Composition, storage_bytes
from .spectra import lora_factors


def layer_of(module) -> LayerShape:
    """The layer a module adapts, as the output of a composition stores it."""
    return LayerShape(module.out_features, module.in_features, module.kernel_size if module.is_conv else None)


def plain_modules(source: LoraAdapter, rule: RankRule | None, layers: BaseLayers, report: CompositionReport, *,
                  svd: str = "auto", seed: int = 0, dtype: torch.dtype = torch.float32,
                  progress: Progress | None = None, device: torch.device | None = None,
                  check: FiniteCheck | None = None) -> dict[str, LoraModule]:
    """Each weight-matrix module of ``source`` as a plain LoRA module (see the module docstring), computed
    on ``device`` (default: the CPU); the per-module results go into ``report`` and what no LoRA can
    hold into its notes. With ``check``, modules that fail it are left out (the caller raises)."""

    def convert_one(item: tuple[str, object]) -> tuple[LoraModule, ModuleReport] | None:
        key, module = item
        if check is not None and not check.passes(key):
            return None
        if not module.is_matrix:
            return None
        if module.kind == "lora":
            if keeps_everything(rule, module.rank):
                return module.to(dtype), ModuleReport(module.rank, module.rank)
            moved = on_device(module, device)
            up, down = moved.factors(work_dtype(moved.up, moved.down))
            up, down, entry = reduce_factors(up, down, rule, torch.full((module.rank,), module.scale))
        else:
            base = on_device(layers.weight(key, module), device)
            up, down, entry = lora_factors(on_device(module, device), rule, base=base, svd=svd, seed=seed)
        result = module_from_factors(up, down, layer_of(module), dtype), entry
        source.release(key)  # streaming: the input's memory does not grow with the modules done
        return result

    modules: dict[str, LoraModule] = {}
    items = list(source.modules.items())
    for (key, _), result in zip(items, map_modules(convert_one, items, progress, names=[key for key, _ in items],
                                                    workers=workers_for(device))):
        if result is not None:
            modules[key], report.modules[key] = result
    report.notes += left_out_notes(source)
    dora = [k for k, m in source.modules.items() if m.kind == "dora" and k in report.modules]
    if dora:
        worst = max(report.modules[k].error for k in dora)
        report.notes.append(f"{len(dora)} DoRA module(s) were computed on {layers.name}: their ΔW depends on the base "
                            f"weights, so the LoRA reproduces them on that model only (largest error {worst:.2g})")
    return modules


def left_out_notes(source: LoraAdapter) -> list[str]:
    """What no LoRA can hold in ``source``: norm-layer and bias differences (for the report's notes)."""
    notes = []
    vectors = Counter(m.kind for m in source.modules.values() if not m.is_matrix)
    if vectors:
        named = ", ".join(f"{n} {KIND_TITLES[k]}" for k, n in vectors.items())
        notes.append(f"left out {sum(vectors.values())} module(s) that change norm layers or biases only ({named}); "
                     "no LoRA can hold them")
    biases = sum(1 for m in source.modules.values() if m.is_matrix and m.bias_delta() is not None)
    if biases:
        notes.append(f"left out the bias differences (diff_b) of {biases} full-rank module(s); no LoRA can hold them")
    return notes


def to_lora(adapter: AdapterLike, rank: int | None = None, *, dynamic: str | None = None, max_rank: int | None = None,
            base: str | Path | None = None, svd: str = "auto", seed: int = 0, dtype: torch.dtype | None = None,
            progress: Progress | None = None, device: str | torch.device | None = "auto") -> Composition:
    """A plain LoRA of ``adapter`` (LyCORIS, DoRA, or plain): exact without ``rank``/``dynamic``, else optimal.

    ``base`` (a diffusers folder or single-file checkpoint, or a mapping of layer weights) is needed
    for DoRA modules. ``svd`` (``auto``, ``exact``, ``randomized``) is how full-rank differences and
    DoRA deltas are factorised at a fixed rank. ``dtype`` is the output's storage dtype. ``device``
    (``auto``, ``cpu``, ``cuda``) is where each module is computed (see :mod:`loralib.device`).
    """
    if svd not in SVD_METHODS:
        raise InvalidArgumentError(f"unknown SVD method {svd!r}", f"Choose one of {', '.join(SVD_METHODS)}")
    rule = rank_rule(rank, dynamic, max_rank)
    device = resolve_device(device)
    source = load(adapter)
    dtype = dtype or source.dtype or torch.float32
    name = source.source_path.name if source.source_path else "the adapter"
    report = CompositionReport("to-lora")
    with BaseLayers.open(base, needing_base([(name, source.modules)])) as layers:
        modules = plain_modules(source, rule, layers, report, svd=svd, seed=seed, dtype=dtype, progress=progress,
                                device=device)
    if not modules:
        raise InvalidArgumentError(f"{name} has no module that a LoRA can hold (only norm-layer or bias differences)")
    result = LoraAdapter(modules, source.architecture, source.source_format, dict(source.metadata),
                         dict(source.embeddings))
    report.parameters, report.bytes = result.parameter_count, storage_bytes(result)
    params = {**(rule.params() if rule else {"rank_rule": "exact"}), "svd": svd,
              "from_kinds": ", ".join(sorted(source.kinds))}
    if base is not None and not isinstance(base, dict):
        params["base"] = Path(base).name
    operation = OperationRecord("to-lora", [input_record(source)], {"rank": rank, "params": params})
    return Composition(result, report, operation)
