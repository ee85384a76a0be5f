"""A module's output rows: the part of a fused layer one internal module stands for, exactly.

Flux's fused layers (``qkv``, ``linear1``) hold several diffusers layers as consecutive blocks of
output rows, and its final modulation stores its two halves of rows exchanged. Taking rows of
``ΔW`` is exact for every kind that is linear in its row factor:

- LoRA: rows of ``up`` (and of a ``diff_b`` bias);
- LoHa: ``((A1 B1) ⊙ (A2 B2))[rows] = (A1[rows] B1) ⊙ (A2[rows] B2)`` (Tucker: columns of ``w1_a``/``w2_a``);
- LoKr: ``kron(W1, W2)`` with ``W2`` of ``c`` rows: rows ``r0..r1`` with ``c`` dividing both are
  ``kron(W1[r0/c : r1/c], W2)`` (for ``W1 = w1_a @ w1_b``, rows of ``w1_a``);
- full differences: rows of ``diff`` and ``diff_b``;
- DoRA with one magnitude per output row: rows of the inner module and of the magnitude (each
  row's norm is its own). A per-input magnitude normalises whole columns, so only a permutation of
  all rows keeps it exact.

:func:`row_blocks_error` tells from shapes alone (before any tensor is read) whether a module
splits, so a reader can refuse a file in one line instead of building a wrong module.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where rows are taken: reading a header (inspect, scan) stays torch-free
    import torch

    from ..adapter import AdapterModule

Blocks = tuple[tuple[int, int], ...]


def _cat(tensor: torch.Tensor, blocks: Blocks, dim: int = 0, unit: int = 1) -> torch.Tensor:
    import torch

    parts = [tensor.narrow(dim, start // unit, (stop - start) // unit) for start, stop in blocks]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)).contiguous()


def _bias(bias: torch.Tensor | None, blocks: Blocks) -> torch.Tensor | None:
    return None if bias is None else _cat(bias, blocks)


def is_permutation(blocks: Blocks, out_features: int) -> bool:
    """True when the blocks cover every row exactly once (a reordering, not a selection)."""
    position = 0
    for start, stop in sorted(blocks):
        if start != position:
            return False
        position = stop
    return position == out_features


def take_rows(module: AdapterModule, blocks: Blocks) -> AdapterModule:
    """The module whose ``ΔW`` is ``module``'s rows ``blocks`` (``(start, stop)`` pairs, concatenated in order).

    Raises ValueError where the rows cannot be taken exactly (see :func:`row_blocks_error`).
    """
    from ..adapter import LoraModule
    from . import kinds

    blocks = tuple((int(s), int(e)) for s, e in blocks)
    if isinstance(module, kinds.DoraModule):
        if module.axis == "in" and not is_permutation(blocks, module.out_features):
            raise ValueError("a DoRA module with per-input magnitudes does not split by output rows")
        magnitude = _cat(module.magnitude, blocks) if module.axis == "out" else module.magnitude
        return replace(module, inner=take_rows(module.inner, blocks), magnitude=magnitude)
    if isinstance(module, LoraModule):
        return replace(module, up=_cat(module.up, blocks), bias=_bias(module.bias, blocks))
    if isinstance(module, kinds.LohaModule):
        dim = 1 if module.t1 is not None else 0
        return replace(module, w1_a=_cat(module.w1_a, blocks, dim), w2_a=_cat(module.w2_a, blocks, dim),
                       bias=_bias(module.bias, blocks))
    if isinstance(module, kinds.LokrModule):
        unit = module.weight_shape[0] // (module.w1 if module.w1 is not None else module.w1_a).shape[0]
        if any(s % unit or e % unit for s, e in blocks):
            raise ValueError(f"a LoKr module whose right factor has {unit} rows does not split at rows {list(blocks)}")
        if module.w1 is not None:
            return replace(module, w1=_cat(module.w1, blocks, unit=unit), bias=_bias(module.bias, blocks))
        return replace(module, w1_a=_cat(module.w1_a, blocks, unit=unit), bias=_bias(module.bias, blocks))
    if isinstance(module, kinds.FullModule) and not isinstance(module, kinds.NormModule):
        return replace(module, diff=None if module.diff is None else _cat(module.diff, blocks),
                       diff_b=_bias(module.diff_b, blocks))
    raise ValueError(f"a {module.kind} module has no output rows to take")


def row_blocks_error(family: str, shapes: dict[str, tuple[int, ...]], out_features: int, blocks: Blocks,
                     magnitude_axis: str | None) -> str | None:
    """Why the rows ``blocks`` of a stored module cannot be taken exactly, or None when they can.

    ``family`` is the stored kind (``lora``, ``loha``, ``lokr``, ``full``, ``norm``), ``shapes`` its
    tensors' shapes by role, ``magnitude_axis`` its DoRA magnitude's axis (None without one).
    """
    if magnitude_axis == "in" and not is_permutation(blocks, out_features):
        return ("its DoRA magnitude is per input channel (LyCORIS wd_on_output=False), which normalises whole "
                "columns of the fused layer, so it does not split into the layers it fuses")
    if family == "norm":
        return "a norm-layer difference has no output rows to split"
    if family == "lokr":
        left = shapes.get("w1") or shapes.get("w1_a")
        unit = out_features // int(left[0])
        if any(s % unit or e % unit for s, e in blocks):
            return (f"its LoKr right factor has {unit} rows, which do not divide the boundaries "
                    f"{sorted({b for block in blocks for b in block})} of the layers it fuses")
    return None
