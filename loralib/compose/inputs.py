"""The inputs of a composition: adapters with weights, loaded and checked to fit together.

Every check runs before any output is computed or written: all inputs must be adapters lorareg
reads (any module kind, see :mod:`loralib.lycoris`), of one architecture, and every module present
in several inputs must adapt a layer of the same shape in each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter import LoraAdapter, LoraModule, is_finite
from ..architectures import ARCHITECTURES, UNKNOWN
from ..errors import CorruptFileError, InvalidArgumentError, MismatchError
from ..layers import LayerShape

AdapterLike = LoraAdapter | str | Path
Progress = Callable[[int, int], None]
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class WeightedAdapter:
    """One input: the adapter, its weight, and how messages name it."""

    adapter: LoraAdapter
    weight: float
    name: str


def adapter_name(adapter: LoraAdapter, position: int) -> str:
    """How messages name an input: its file name, else its position."""
    return adapter.source_path.name if adapter.source_path else f"input {position + 1}"


def load(adapter: AdapterLike) -> LoraAdapter:
    """An adapter object, loading it when given a path."""
    if isinstance(adapter, LoraAdapter):
        return adapter
    from ..formats import load_adapter

    return load_adapter(adapter)


def require_computable(adapter: LoraAdapter, name: str, weight: float = 1.0, *, values: bool = True) -> None:
    """Raise :class:`CorruptFileError` when ``adapter`` holds NaN or infinite factor values, or a
    scale (alpha / rank, times ``weight``) beyond float32's range: no decomposition can use them.

    ``values=False`` checks the scales only; a computation that reads every module anyway checks
    the values as it goes, with :class:`FiniteCheck`."""
    bad = adapter.nonfinite_modules() if values else []
    if bad:
        raise nonfinite_error(name, bad)
    huge = [key for key, m in adapter.modules.items() if abs(getattr(m, "scale", 1.0) * weight) > FLOAT32_MAX]
    if huge:
        module = adapter.modules[huge[0]]
        raise CorruptFileError(f"{name} has a scale too large to compute with in {len(huge)} module(s): {_listed(huge)} "
                               f"(alpha {module.alpha:g} at rank {module.rank})",
                               "The file is damaged, or its alphas were written by a broken converter")


def nonfinite_error(name: str, keys: Sequence[str]) -> CorruptFileError:
    """The error for an input ``name`` whose modules ``keys`` hold NaN or infinite values."""
    return CorruptFileError(f"{name} holds NaN or infinite values in {len(keys)} module(s): {_listed(keys)}",
                            "The adapter is damaged; it cannot be merged or resized")


class FiniteCheck:
    """Checks the inputs' factor values for NaN and infinity module by module, as a computation
    reaches each module, instead of in a pass of its own before it.

    The computation reads every value anyway: checking right before it means one pass over a
    file's pages instead of two, on the computation's threads. A module that fails is not
    computed (no factorisation could use it); :meth:`raise_if_failed`, once every module is done
    and before anything is written, raises what :func:`require_computable` would have.
    """

    def __init__(self, inputs: Sequence[tuple[str, LoraAdapter]]) -> None:
        self.inputs = list(inputs)
        self.failed: list[set[str]] = [set() for _ in self.inputs]

    def passes(self, key: str) -> bool:
        """True when every input's module ``key`` (where it has one) holds finite values only."""
        good = True
        for (_, adapter), failed in zip(self.inputs, self.failed):
            module = adapter.modules.get(key)
            if module is not None and not is_finite(module):
                failed.add(key)  # a set's add is atomic under the GIL: safe from the worker threads
                good = False
        return good

    def raise_if_failed(self) -> None:
        """Raise :class:`CorruptFileError` naming the first input with a failed module, and its modules."""
        for (name, adapter), failed in zip(self.inputs, self.failed):
            if failed:
                raise nonfinite_error(name, [key for key in adapter.modules if key in failed])


def _listed(keys: Sequence[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def load_weighted(inputs: Iterable[AdapterLike | tuple[AdapterLike, float]], *,
                  allow_nonfinite: bool = False, check_values: bool = True) -> list[WeightedAdapter]:
    """Load ``[(adapter_or_path, weight), …]`` (a bare adapter has weight 1) and check the weights.

    Inputs with NaN or infinite values are refused (:func:`require_computable`) unless
    ``allow_nonfinite``; ``check_values=False`` leaves the values to the caller's :class:`FiniteCheck`.
    """
    loaded = []
    for position, item in enumerate(inputs):
        source, weight = item if isinstance(item, tuple) else (item, 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"the weight of input {position + 1} is {weight!r}, not a number") from exc
        if not math.isfinite(weight):
            raise InvalidArgumentError(f"the weight of input {position + 1} is {weight}", "Use a finite number")
        adapter = load(source)
        name = adapter_name(adapter, position)
        if not allow_nonfinite:
            require_computable(adapter, name, weight, values=check_values)
        loaded.append(WeightedAdapter(adapter, weight, name))
    if not loaded:
        raise InvalidArgumentError("nothing to combine: no input adapters were given")
    return loaded


def layer_signature(module: LoraModule) -> tuple[int, int, tuple[int, int]]:
    """``(out, in, kernel)`` of the adapted layer; a Linear and a 1×1 conv of equal widths agree."""
    return module.out_features, module.in_features, module.kernel_size


def check_compatible(inputs: Sequence[WeightedAdapter]) -> str:
    """Raise :class:`MismatchError` unless the inputs fit one model; returns their architecture."""
    known = [(w.name, w.adapter.architecture) for w in inputs if w.adapter.architecture in ARCHITECTURES]
    for name, arch in known[1:]:
        if arch != known[0][1]:
            first_name, first_arch = known[0]
            raise MismatchError(
                f"{first_name} is a {ARCHITECTURES[first_arch].title} adapter but {name} is a "
                f"{ARCHITECTURES[arch].title} adapter; they cannot be combined",
                "Combine adapters made for the same base model")
    seen: dict[str, tuple[str, LoraModule]] = {}
    for item in inputs:
        for key, module in item.adapter.modules.items():
            if key not in seen:
                seen[key] = (item.name, module)
                continue
            other_name, other = seen[key]
            if layer_signature(other) != layer_signature(module):
                raise MismatchError(
                    f"{key} adapts a layer of shape {list(other.weight_shape)} in {other_name} but "
                    f"{list(module.weight_shape)} in {item.name}",
                    "The adapters were made for different base models")
    return known[0][1] if known else UNKNOWN


def union_keys(inputs: Sequence[WeightedAdapter]) -> list[str]:
    """Every module key of any input, in order of first appearance."""
    keys: dict[str, None] = {}
    for item in inputs:
        keys.update(dict.fromkeys(item.adapter.modules))
    return list(keys)


def common_dtype(adapters: Iterable[LoraAdapter]) -> torch.dtype:
    """The storage dtype the inputs share, else float32."""
    dtypes = {a.dtype for a in adapters if a.dtype is not None}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def output_shape(modules: Sequence[LoraModule]) -> LayerShape:
    """The layer the merged modules adapt; a conv if any input stores it as one."""
    conv = next((m for m in modules if m.is_conv), None)
    first = conv or modules[0]
    return LayerShape(first.out_features, first.in_features, conv.kernel_size if conv else None)


def module_from_factors(up: torch.Tensor, down: torch.Tensor, shape: LayerShape, dtype: torch.dtype) -> LoraModule:
    """A module with ``ΔW = up @ down`` for a layer of ``shape`` (alpha = rank, so scale 1), stored on the CPU."""
    rank = int(down.shape[0])
    if shape.is_conv:
        kh, kw = shape.kernel_size
        down = down.reshape(rank, shape.in_features, kh, kw)
        up = up.reshape(shape.out_features, rank, 1, 1)
    return LoraModule(down.to("cpu", dtype).contiguous(), up.to("cpu", dtype).contiguous(), float(rank))


def merge_embeddings(inputs: Sequence[WeightedAdapter], notes: list[str]) -> dict[str, torch.Tensor]:
    """Textual-inversion tokens of all inputs; on a name clash the first input's vectors win (noted)."""
    merged: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for item in inputs:
        for token, vectors in item.adapter.embeddings.items():
            if token not in merged:
                merged[token], owner[token] = vectors, item.name
            elif not torch.equal(merged[token], vectors):
                notes.append(f"token {token} is defined by both {owner[token]} and {item.name}; kept {owner[token]}'s")
    return merged
