"""Splitting fused LoRA layers (Flux/SD3 qkv, Flux linear1) and fusing them back, exactly.

The oracle is the dense ΔW computed directly from the factors: every split and fuse must keep
it (bit for bit where nothing is rescaled), and the round trips fused → split → fused and
split → fused → split must give back the same tensors bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from loralib.adapter import LoraModule
from loralib.formats.fusing import fuse, native_modules, split, swap_halves

WIDTH = 16


def _module(out: int, rank: int, alpha: float, seed: int, dtype=torch.float32) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(torch.randn(rank, WIDTH, generator=g).to(dtype), torch.randn(out, rank, generator=g).to(dtype), alpha)


def _delta(module: LoraModule) -> torch.Tensor:
    return module.scale * module.up.double() @ module.down.double()


def _ranges(sizes):
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def _same(a: LoraModule, b: LoraModule) -> bool:
    return torch.equal(a.down, b.down) and torch.equal(a.up, b.up) and a.alpha == b.alpha and a.down.dtype == b.down.dtype


@pytest.mark.parametrize("ranks, alphas, sizes", [
    ((4, 4, 4), (4.0, 4.0, 4.0), (WIDTH,) * 3),  # q, k, v of equal rank (alpha = rank)
    ((8, 8, 8), (4.0, 4.0, 4.0), (WIDTH,) * 3),  # alpha / rank = 0.5
    ((4, 8, 2), (2.0, 4.0, 1.0), (WIDTH,) * 3),  # unequal ranks, one scale
    ((4, 4, 4, 4), (3.0, 3.0, 3.0, 3.0), (WIDTH, WIDTH, WIDTH, 4 * WIDTH)),  # Flux linear1: q, k, v, mlp
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_fuse_split_is_bit_exact(ranks, alphas, sizes, dtype):
    parts = [_module(size, r, a, i, dtype) for i, (size, r, a) in enumerate(zip(sizes, ranks, alphas))]
    fused = fuse(parts, sizes)
    assert fused.rank == sum(ranks)
    dense = torch.cat([_delta(p) for p in parts])
    assert torch.allclose(_delta(fused), dense, rtol=1e-12, atol=1e-12)
    again = split(fused.down, fused.up, fused.alpha, _ranges(sizes))
    assert all(_same(a, b) for a, b in zip(parts, again))
    assert _same(fuse(again, sizes), fused)


def test_fused_with_one_down_splits_sharing_it_and_fuses_back_at_its_rank():
    fused = _module(3 * WIDTH, 6, 3.0, 0)
    parts = split(fused.down, fused.up, fused.alpha, _ranges((WIDTH,) * 3))
    assert all(p.down is fused.down and p.rank == 6 and p.alpha == 3.0 for p in parts)
    assert torch.equal(torch.cat([p.up for p in parts]), fused.up)
    refused = fuse(parts, (WIDTH,) * 3)
    assert _same(refused, fused)


def test_a_zero_part_and_a_missing_part():
    q, v = _module(WIDTH, 4, 4.0, 1), _module(WIDTH, 4, 4.0, 2)
    fused = fuse([q, None, v], (WIDTH,) * 3)
    assert fused.rank == 8 and torch.count_nonzero(fused.up[WIDTH:2 * WIDTH]) == 0
    parts = split(fused.down, fused.up, fused.alpha, _ranges((WIDTH,) * 3))
    assert parts[1] is None and _same(parts[0], q) and _same(parts[2], v)


def test_different_scales_are_folded_exactly_in_delta():
    parts = [_module(WIDTH, 4, a, i) for i, a in enumerate((4.0, 2.0, 1.0))]
    fused = fuse(parts, (WIDTH,) * 3)
    expected = torch.cat([_delta(p) for p in parts])
    assert torch.allclose(_delta(fused), expected, rtol=1e-5, atol=1e-6)


def test_fused_rank_is_the_optimal_approximation():
    parts = [_module(WIDTH, 4, 4.0, i) for i in range(3)]
    exact = torch.cat([_delta(p) for p in parts])
    reduced = fuse(parts, (WIDTH,) * 3, rank=5)
    assert reduced.rank == 5
    u, s, vh = torch.linalg.svd(exact)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert torch.allclose(_delta(reduced), best, atol=1e-5)


def test_swapped_halves_are_an_involution():
    t = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(swap_halves(t)[:3], t[3:]) and torch.equal(swap_halves(swap_halves(t)), t)


def test_native_modules_fuse_flux_layers_and_swap_the_final_modulation():
    modules = {f"transformer.transformer_blocks.0.attn.{p}": _module(WIDTH, 2, 2.0, i)
               for i, p in enumerate(("to_q", "to_k", "to_v"))}
    modules["transformer.norm_out.linear"] = _module(2 * WIDTH, 2, 2.0, 9)
    native = native_modules(modules, "flux")
    assert set(native) == {"double_blocks.0.img_attn.qkv", "final_layer.adaLN_modulation.1"}
    assert native["double_blocks.0.img_attn.qkv"].rank == 6
    norm = native["final_layer.adaLN_modulation.1"]
    assert torch.equal(norm.up, swap_halves(modules["transformer.norm_out.linear"].up))
