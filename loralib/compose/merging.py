"""Merge LoRA adapters: ``merge([(a, 0.7), (b, -0.3)], rank=32)``.

Methods, per module:

- ``concat`` (default): the exact weighted sum ``Σ w_i · scale_i · up_i @ down_i``, written as
  the concatenation ``up = [w_1 s_1 up_1, …]``, ``down = [down_1; …]`` (rank = sum of ranks).
  With a rank (or dynamic rule) the sum is then truncated optimally through the QR route,
  never forming the dense ``m × n`` matrix.
- ``linear``: peft's ``combination_type="linear"`` — factor-wise weighted sums
  ``up = Σ √|c_i| up_i``, ``down = Σ sign(c_i) √|c_i| down_i`` (equal ranks required). This is NOT
  the weighted sum of deltas (cross terms appear); it exists to reproduce peft, and the report
  gives its exact error against the true sum.
- ``ties`` / ``dare``: see :mod:`loralib.compose.ties_dare`; computed on dense per-module deltas,
  then truncated to the requested rank (default: the sum of the input ranks).

The output uses alpha = rank (scale 1) on every module, so its ``ΔW`` is exactly its factors'
product and its alpha metadata is a whole number.

Inputs may hold any module kind; the output is a plain LoRA. LoHa and LoKr modules take part through
their exact low-rank forms (so ``concat`` stays exact); a module without one (a full-rank
difference, or DoRA, whose ``ΔW`` needs the base model given as ``base``) makes that layer's sum
dense, factorised by an SVD (full rank, exact up to rounding, when no rank is asked). Norm-layer
and bias differences are left out, with a note: no LoRA holds them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..adapter import AdapterModule, LoraAdapter, LoraModule
from ..device import on_device, resolve_device, workers_for
from ..errors import InvalidArgumentError, MismatchError, UnsupportedFormatError
from ..lycoris.shapes import product
from ..metadata import input_record
from ..records import OperationRecord
from ..vocabulary import MERGE_METHODS
from .base_layers import BaseLayers, needing_base
from .inputs import (
    AdapterLike,
    FiniteCheck,
    Progress,
    WeightedAdapter,
    check_compatible,
    common_dtype,
    load_weighted,
    merge_embeddings,
    module_from_factors,
    output_shape,
    union_keys,
)
from .lowrank import SVD_METHODS, balance, norm_ratio, relative_distance, stack, work_dtype
from .parallel import map_modules
from .plain import left_out_notes
from .rank_rules import RankRule, rank_rule
from .reduce import keeps_everything, reduce_dense, reduce_factors
from .report import CompositionReport, ModuleReport
from .result import Composition, storage_bytes
from .ties_dare import dare, module_seed, task_vectors, ties

METHODS = MERGE_METHODS

Part = tuple[AdapterModule, float, int]  # module, weight, input position
Bases = dict[int, torch.Tensor | None]  # input position -> the base weight its module needs (DoRA)


def merge(inputs: Iterable[AdapterLike | tuple[AdapterLike, float]], rank: int | None = None, *,
          method: str = "concat", dynamic: str | None = None, max_rank: int | None = None,
          density: float | None = None, seed: int = 0, svd: str = "auto", dtype: torch.dtype | None = None,
          base: str | Path | None = None, progress: Progress | None = None,
          allow_nonfinite: bool = False, device: str | torch.device | None = "auto") -> Composition:
    """Merge weighted adapters (objects or paths) into one; see the module docstring for methods.

    ``rank`` truncates every module to at most that rank (best approximation); ``dynamic``
    (``sv_fro:0.95``, ``sv_ratio:N``, ``sv_cumulative:F``) chooses per module, capped by ``max_rank``.
    ``density`` and ``seed`` are TIES/DARE parameters; ``svd`` (``auto``, ``exact``,
    ``randomized``) how their dense deltas are factorised. ``dtype`` is the output's storage dtype
    (default: the inputs' common dtype, else float32). ``base`` is the base model (a diffusers
    folder or single-file checkpoint), needed only for DoRA inputs. Inputs with NaN or infinite
    values are refused unless ``allow_nonfinite``, which only an exact merge (concat, no rank rule)
    can honour; the result must then be saved with ``allow_nonfinite`` too. ``device`` (``auto``,
    ``cpu``, ``cuda``) is where each module is computed (see :mod:`loralib.device`).
    """
    method = _check_method(method, density)
    if svd not in SVD_METHODS:
        raise InvalidArgumentError(f"unknown SVD method {svd!r}", f"Choose one of {', '.join(SVD_METHODS)}")
    rule = rank_rule(rank, dynamic, max_rank)
    if allow_nonfinite and (method != "concat" or rule is not None):
        raise InvalidArgumentError("allowing NaN or infinite values only works for an exact merge",
                                   "Use the default method (concat) without --rank or --dynamic")
    device = resolve_device(device)
    items = load_weighted(inputs, allow_nonfinite=allow_nonfinite, check_values=False)
    check = None if allow_nonfinite else FiniteCheck([(item.name, item.adapter) for item in items])
    architecture = check_compatible(items)
    if method == "linear":
        _check_equal_ranks(items)
    dtype = dtype or common_dtype(i.adapter for i in items)
    report = CompositionReport("merge")
    keys = union_keys(items)
    weighted = [item for item in items if item.weight != 0]
    layers = BaseLayers.open(base, needing_base([(i.name, i.adapter.modules) for i in weighted]))

    def merge_one(key: str) -> tuple[LoraModule, ModuleReport] | None:
        if check is not None and not check.passes(key):
            return None
        parts = [(item.adapter.modules[key], item.weight, position) for position, item in enumerate(items)
                 if key in item.adapter.modules and item.weight != 0 and item.adapter.modules[key].is_matrix]
        if not parts:
            return None
        bases = {position: on_device(layers.weight(key, module), device) for module, _, position in parts}
        parts = [(on_device(module, device), weight, position) for module, weight, position in parts]
        up, down, entry = _merge_module(key, parts, method, rule, density, seed, svd, bases)
        merged = module_from_factors(up, down, output_shape([p[0] for p in parts]), dtype), entry
        for item in items:  # streaming: the inputs' memory does not grow with the modules done
            item.adapter.release(key)
        return merged

    modules: dict[str, LoraModule] = {}
    with layers:
        for key, merged in zip(keys, map_modules(merge_one, keys, progress, names=keys, workers=workers_for(device))):
            if merged is not None:
                modules[key], report.modules[key] = merged
    if check is not None:
        check.raise_if_failed()
    for item in weighted:
        report.notes += [f"{item.name}: {line}" for line in left_out_notes(item.adapter)]
    skipped = sum(1 for key in keys if key not in modules
                  and any(key in i.adapter.modules and i.adapter.modules[key].is_matrix for i in items))
    if skipped:
        report.notes.append(f"left out {skipped} module(s) that only inputs of weight 0 adapt")
    if not modules:
        raise InvalidArgumentError("the merge is empty: every input has weight 0")
    embeddings = merge_embeddings(items, report.notes)
    metadata = {"modelspec.merged_from": ", ".join(i.name for i in items)}
    adapter = LoraAdapter(modules, architecture, None, metadata, embeddings)
    report.parameters, report.bytes = adapter.parameter_count, storage_bytes(adapter)
    operation = OperationRecord("merge", [input_record(i.adapter, i.weight) for i in items],
                                {"method": method, "rank": rank, "params": _params(rule, density, seed, method, svd)})
    return Composition(adapter, report, operation)


def _check_method(method: str, density: float | None) -> str:
    method = method.lower()
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown merge method {method!r}", f"Choose one of {', '.join(METHODS)}")
    if method in ("ties", "dare"):
        if density is None:
            raise InvalidArgumentError(f"{method} needs a density: the fraction of each delta's entries to keep",
                                       "Give --density, e.g. 0.2 (the TIES paper keeps 20%) or 0.5")
        if not 0 < density <= 1:
            raise InvalidArgumentError(f"the density must be in (0, 1], not {density}")
    elif density is not None:
        raise InvalidArgumentError(f"a density applies to the ties and dare methods, not {method}")
    return method


def _check_equal_ranks(items: Sequence[WeightedAdapter]) -> None:
    ranks: dict[str, tuple[int, str]] = {}
    for item in items:
        if not item.adapter.is_plain:
            raise UnsupportedFormatError(
                f"the linear method sums LoRA factors, but {item.name} has modules of other kinds "
                f"({', '.join(k for k in item.adapter.kinds if k != 'lora')})",
                "Use the default exact method (concat), optionally with --rank")
        for key, module in item.adapter.modules.items():
            first = ranks.setdefault(key, (module.rank, item.name))
            if first[0] != module.rank:
                raise MismatchError(
                    f"the linear method needs equal ranks, but {key} has rank {first[0]} in {first[1]} "
                    f"and {module.rank} in {item.name}",
                    "Use the default exact method (concat), optionally with --rank")


def _params(rule: RankRule | None, density: float | None, seed: int, method: str, svd: str) -> dict:
    params = rule.params() if rule is not None else {}
    if method in ("ties", "dare"):
        params.update(density=density, svd=svd)
    if method == "dare":
        params["seed"] = seed
    return params


def _merge_module(key: str, parts: Sequence[Part], method: str, rule: RankRule | None, density: float | None,
                  seed: int, svd: str, bases: Bases) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    dense = any(module.exact_rank is None for module, _, _ in parts)
    first = parts[0][0]
    full = min(first.out_features, product(first.weight_shape[1:]))
    total_rank = sum(module.exact_rank or full for module, _, _ in parts)
    if method in ("ties", "dare"):
        deltas = task_vectors([(module, weight) for module, weight, _ in parts], [bases[p] for _, _, p in parts])
        if method == "ties":
            merged = ties(deltas, density)
        else:
            merged = dare(deltas, density, [module_seed(seed, key, position) for _, _, position in parts])
        return reduce_dense(merged, rule or RankRule("fixed", total_rank), svd=svd, seed=seed,
                            input_rank=total_rank)
    if dense:  # a full-rank difference or DoRA: the weighted sum is a dense matrix
        deltas = task_vectors([(module, weight) for module, weight, _ in parts], [bases[p] for _, _, p in parts])
        merged = torch.stack(deltas).sum(dim=0)
        return reduce_dense(merged, rule or RankRule("fixed", min(merged.shape)),
                            svd="exact" if rule is None else svd, seed=seed, input_rank=min(merged.shape))
    if method == "concat":
        if keeps_everything(rule, total_rank):
            up, down = exact_factors(parts)
            return up, down, ModuleReport(total_rank, total_rank)
        up, down, scale = stacked_factors(parts)
        return reduce_factors(up, down, rule, scale)
    exact_up, exact_down = exact_factors(parts)
    up, down = _linear(parts)
    if not keeps_everything(rule, up.shape[1]):
        up, down, _ = reduce_factors(up, down, rule)
    error = relative_distance(up, down, exact_up, exact_down)
    return up, down, ModuleReport(parts[0][0].rank, int(down.shape[0]),
                                  norm_ratio(up, down, exact_up, exact_down), error)


def _dtype(parts: Sequence[Part]) -> torch.dtype:
    return torch.float64 if any(module.dtype == torch.float64 for module, _, _ in parts) else torch.float32


def exact_factors(parts: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the exact weighted sum ``Σ w_i · ΔW_i``: each module's exact low-rank form (LoRA,
    LoHa, LoKr), concatenated, each block balanced."""
    dtype = _dtype(parts)
    balanced = []
    for module, weight, _ in parts:
        up, down, coefficient = module.low_rank(dtype)
        balanced.append(balance(up, down, weight * coefficient))
    return stack(balanced, dtype)


def stacked_factors(parts: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(up, down, scale)`` with ``up @ diag(scale) @ down`` the exact weighted sum (no scaling pass).

    Plain LoRA factors are read as stored and widened straight into their place (:func:`stack`)."""
    dtype = _dtype(parts)
    factors = [module.low_rank(module.dtype if _stored_as_is(module) else dtype) for module, _, _ in parts]
    scale = torch.cat([torch.full((f[0].shape[1],), weight * f[2], dtype=torch.float64)
                       for f, (_, weight, _) in zip(factors, parts)])
    up, down = stack([(up, down) for up, down, _ in factors], dtype)
    return up, down, scale


def _stored_as_is(module: AdapterModule) -> bool:
    """True when a module's low-rank factors are its stored tensors (a LoRA without a CP mid)."""
    return module.kind == "lora" and getattr(module, "mid", None) is None and module.dtype.is_floating_point


def _linear(parts: Sequence[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's "linear" combination: weighted sums of the factors, the sign on ``down``."""
    dtype = work_dtype(*(t for module, _, _ in parts for t in (module.up, module.down)))
    up_sum, down_sum = 0, 0
    for module, weight, _ in parts:
        up, down = module.factors(dtype)
        coefficient = weight * module.scale
        root = abs(coefficient) ** 0.5
        up_sum = up_sum + root * up
        down_sum = down_sum + (root if coefficient >= 0 else -root) * down
    return up_sum, down_sum
