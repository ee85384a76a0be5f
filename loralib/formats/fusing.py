"""Split fused LoRA modules into the modules lorareg keys by, and fuse them back, exactly.

Flux's BFL names and SD3's MMDiT names store q, k and v (and Flux's MLP input) in one Linear,
so a LoRA on it has one ``down`` ``[R, in]`` and one ``up`` whose consecutive row blocks belong to
diffusers' ``to_q``, ``to_k``, ``to_v`` (…). Since ``ΔW = up @ down``, each part's ΔW is its rows
of ``up`` times the shared ``down``: splitting is exact. When a part's rows of ``up`` are zero
outside its own block of columns — a block-diagonal fuse of separate LoRAs writes them so — the
part keeps only its columns (and the matching rows of ``down``), so its rank is its own again.

Fusing is the reverse: parts that share one ``down`` tensor fuse at that rank (their ``up`` rows
stacked); others fuse block-diagonally, ``down = [D_q; D_k; D_v]`` and ``up = blockdiag(U_q, U_k,
U_v)`` of rank ``r_q + r_k + r_v``; a missing part is a zero block. Both directions keep every
tensor bit for bit, so fused → split → fused and split → fused → split return the same files.
When the parts' scales (alpha / rank) differ, they are folded into ``up`` (ΔW exact up to one
rounding). With a rank ``k`` below the fused rank the fused module is the optimal rank-k
approximation of the exact fused ΔW, computed on the factors (QR route, no dense matrix).

The two halves of a final modulation layer (BFL's and SAI's shift/scale order against diffusers'
scale/shift) are a row permutation of ``up``: exact both ways.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise

import torch

from ..adapter import LoraModule
from ..errors import MismatchError


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the two halves of its rows exchanged (an involution)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first]).contiguous()


def swapped(module: LoraModule) -> LoraModule:
    """The module whose ΔW has the two halves of its rows exchanged."""
    return LoraModule(module.down, swap_halves(module.up), module.alpha, module.mid)


def split(down: torch.Tensor, up: torch.Tensor, alpha: float, ranges: Sequence[tuple[int, int]]
          ) -> list[LoraModule | None]:
    """The parts of a fused module, one per row range of ``up`` (None for a part that is zero and owns
    no columns). ``alpha`` is the fused module's (kohya convention)."""
    rank = int(down.shape[0])
    blocks = [up[start:stop] for start, stop in ranges]
    columns = None if _shares_a_column(blocks, rank) else _block_columns([_nonzero_columns(b) for b in blocks], rank)
    if columns is None:  # parts share the whole rank: each keeps the shared down
        return [LoraModule(down, block.contiguous(), alpha) for block in blocks]
    parts: list[LoraModule | None] = []
    for block, cols in zip(blocks, columns):
        if len(cols) == 0:
            parts.append(None)
            continue
        index = torch.as_tensor(cols)
        part_down = down[cols[0]: cols[-1] + 1] if _contiguous(cols) else down.index_select(0, index)
        part_up = block[:, cols[0]: cols[-1] + 1] if _contiguous(cols) else block.index_select(1, index)
        parts.append(LoraModule(part_down.contiguous(), part_up.contiguous(), alpha * len(cols) / rank))
    return parts


def _shares_a_column(blocks: Sequence[torch.Tensor], rank: int) -> bool:
    """True when two parts use the first or the last column: a quick no for block-diagonal
    (every fused layer trained as one has it), before scanning every column."""
    return any(sum(bool(b[:, j].any()) for b in blocks) > 1 for j in {0, rank - 1})


_INT_VIEW = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF)}


def _nonzero_columns(block: torch.Tensor) -> torch.Tensor:
    """Which columns of ``block`` hold a nonzero entry (−0.0 counts as zero); integer compares for speed."""
    view = _INT_VIEW.get(block.element_size()) if block.is_floating_point() else None
    if view is None:
        return (block != 0).any(dim=0)
    dtype, mask = view
    return ((block.contiguous().view(dtype) & mask) != 0).any(dim=0)


def _contiguous(cols: list[int]) -> bool:
    return cols == list(range(cols[0], cols[0] + len(cols)))


def _block_columns(owned: list[torch.Tensor], rank: int) -> list[list[int]] | None:
    """Each part's own columns when the parts' nonzero columns are disjoint (block-diagonal), else None."""
    count = torch.stack(owned).sum(dim=0) if owned else torch.zeros(rank)
    if bool((count > 1).any()) or len(owned) < 2:
        return None
    sets = [torch.nonzero(o).flatten().tolist() for o in owned]
    n = len(sets)
    if rank % n == 0:  # equal blocks, as a fuse of equal ranks writes them
        size = rank // n
        if all(all(i * size <= c < (i + 1) * size for c in cols) for i, cols in enumerate(sets)):
            return [list(range(i * size, (i + 1) * size)) for i in range(n)]
    nonempty = [cols for cols in sets if cols]
    if all(a[-1] < b[0] for a, b in pairwise(nonempty)):  # ordered blocks: zero columns join the next
        columns, start = [], 0
        last = max(i for i, cols in enumerate(sets) if cols) if nonempty else -1
        for i, cols in enumerate(sets):
            stop = rank if i == last else (cols[-1] + 1 if cols else start)
            columns.append(list(range(start, stop)))
            start = stop
        return columns
    return sets


def fuse(parts: Sequence[LoraModule | None], sizes: Sequence[int], rank: int | None = None) -> LoraModule:
    """One module whose ΔW stacks the parts' ΔWs (row blocks of ``sizes``; a missing part is zero).

    ``rank``: the optimal rank-``rank`` approximation when the exact fused rank is higher.
    """
    present = [(i, p) for i, p in enumerate(parts) if p is not None]
    if not present:
        raise ValueError("nothing to fuse")
    for i, part in present:
        if part.is_conv or part.out_features != sizes[i] or part.in_features != present[0][1].in_features:
            raise MismatchError(f"part {i} of a fused layer has shape {list(part.weight_shape)}, but the layer's "
                                f"rows {sizes[i]} x {present[0][1].in_features} were expected")
    modules = [p for _, p in present]
    dtype = modules[0].dtype if len({m.dtype for m in modules}) == 1 else torch.float32
    first = modules[0].down
    if all(_identical(m.down, first) for m in modules):
        fused = _fuse_shared(parts, sizes, dtype)
    else:
        fused = _fuse_blocks(parts, sizes, dtype)
    if rank is not None and fused.rank > rank:
        fused = _reduce(fused, rank)
    return fused


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors hold the same bits (compared as integers: faster than float compares)."""
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = _INT_VIEW.get(a.element_size()) if a.is_floating_point() else None
    if view is None:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(view[0]), b.contiguous().view(view[0]))


def _common_scale(modules: Sequence[LoraModule]) -> float:
    return Counter(m.scale for m in modules).most_common(1)[0][0]


def _scaled_up(module: LoraModule, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``up`` with the module's scale folded in relative to ``scale`` (unchanged when equal)."""
    if module.scale == scale:
        return module.up.to(dtype)
    return (module.up.to(torch.float64) * (module.scale / scale)).to(dtype)


def _fuse_shared(parts: Sequence[LoraModule | None], sizes: Sequence[int], dtype: torch.dtype) -> LoraModule:
    modules = [p for p in parts if p is not None]
    rank = modules[0].rank
    scale = _common_scale(modules)
    ups = [_scaled_up(p, scale, dtype) if p is not None else torch.zeros(size, rank, dtype=dtype)
           for p, size in zip(parts, sizes)]
    alpha = modules[0].alpha if all(m.alpha == modules[0].alpha for m in modules) else scale * rank
    return LoraModule(modules[0].down.to(dtype), _rejoined(ups), alpha)


def _rejoined(ups: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(ups)``, without a copy when they are consecutive row blocks of one tensor (as split
    leaves a fused layer that was read)."""
    first = ups[0]
    offset = first.storage_offset()
    for up in ups:
        if (up.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or up.stride() != first.stride()
                or not up.is_contiguous() or up.storage_offset() != offset):
            return torch.cat(ups)
        offset += up.numel()
    rows = sum(up.shape[0] for up in ups)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _fuse_blocks(parts: Sequence[LoraModule | None], sizes: Sequence[int], dtype: torch.dtype) -> LoraModule:
    modules = [p for p in parts if p is not None]
    total = sum(m.rank for m in modules)
    fold: float | None = None  # the scale the parts' ups are folded to, when their scales differ
    if _equal_scales(modules):
        alpha = _block_alpha(modules, total)
        if alpha is None:
            alpha = modules[0].scale * total
    else:
        fold = _common_scale(modules)
        alpha = fold * total
    up = torch.zeros(sum(sizes), total, dtype=dtype)
    row, column = 0, 0
    for part, size in zip(parts, sizes):
        if part is not None:
            block = part.up.to(dtype) if fold is None else _scaled_up(part, fold, dtype)
            up[row: row + size, column: column + part.rank] = block
            column += part.rank
        row += size
    down = torch.cat([m.down.to(dtype) for m in modules])
    return LoraModule(down, up, alpha)


def _equal_scales(modules: Sequence[LoraModule]) -> bool:
    return len({m.scale for m in modules}) == 1


def _block_alpha(modules: Sequence[LoraModule], total: int) -> float | None:
    """The fused alpha ``A`` from which reading gives back each part's alpha exactly
    (``A · r_i / total == alpha_i``, as :func:`split` computes it), or None if there is none."""
    if not _equal_scales(modules):
        return None
    guess = modules[0].alpha * total / modules[0].rank
    candidates = [guess]
    for direction in (math.inf, -math.inf):
        value = guess
        for _ in range(4):
            value = math.nextafter(value, direction)
            candidates.append(value)
    for candidate in sorted(candidates, key=lambda c: (len(repr(c)), abs(c - guess))):
        if all(candidate * m.rank / total == m.alpha for m in modules):
            return candidate
    return None


def _reduce(module: LoraModule, rank: int) -> LoraModule:
    """The optimal rank-``rank`` approximation of a module's ΔW (exact SVD of the factors)."""
    from ..compose.rank_rules import RankRule
    from ..compose.reduce import reduce_factors

    up, down = module.factors(torch.float32 if module.dtype != torch.float64 else torch.float64)
    new_up, new_down, _ = reduce_factors(up, down, RankRule("fixed", rank), torch.full((module.rank,), module.scale))
    return LoraModule(new_down.to(module.dtype).contiguous(), new_up.to(module.dtype).contiguous(), float(new_down.shape[0]))


def native_modules(modules: dict[str, LoraModule], family: str, *, rank: int | None = None) -> dict[str, LoraModule]:
    """A transformer's modules (internal keys ``transformer.…``) under their original names
    (``double_blocks.0.img_attn.qkv``…), fused where the original model fuses layers.

    ``rank`` caps the rank of fused modules (optimal approximation); others are kept as they are.
    """
    from ..compose.parallel import single_threaded_torch
    from ..naming.flux import FLUX_MAP
    from ..naming.sd3 import SD3_MAP

    with single_threaded_torch():  # small memory-bound work; torch's threads only wait on each other
        return _native_modules(modules, {"flux": FLUX_MAP, "sd3": SD3_MAP}[family], family, rank)


def _native_modules(modules: dict[str, LoraModule], native_map, family: str, rank: int | None) -> dict[str, LoraModule]:
    from ..errors import UnsupportedFormatError

    special = [key for key, module in modules.items() if module.kind != "lora" or module.bias_delta() is not None]
    if special:
        raise UnsupportedFormatError(
            f"{len(special)} {family} transformer module(s), e.g. {special[0]}, are not plain LoRA factors "
            "(LyCORIS, DoRA or a bias difference), which the original model's names cannot hold",
            "Make a plain LoRA of them with convert --plain or --rank N (DoRA also fits the peft format)")
    groups: dict[str, dict[int, LoraModule]] = {}
    rules = {}
    for key, module in modules.items():
        found = native_map.to_native(key.split(".", 1)[1])
        if found is None:
            raise UnsupportedFormatError(f"{key} has no name in the original {family} model",
                                         "Write the diffusers format, which names every module as diffusers does")
        native, part, rule = found
        groups.setdefault(native, {})[part] = module
        rules[native] = rule
    result = {}
    for native, parts in groups.items():
        rule = rules[native]
        if len(rule.parts) == 1:
            module = parts[0]
            narrow = module.out_features == 2 * module.in_features
            result[native] = swapped(module) if rule.swap or (rule.swap_when_narrow and narrow) else module
            continue
        width = next(iter(parts.values())).in_features
        result[native] = fuse([parts.get(i) for i in range(len(rule.parts))], [u * width for u in rule.units], rank)
    return result
