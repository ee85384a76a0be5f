"""Random adapters shaped like a real model's layers, for tests, benchmarks and the demo.

Factors have a decaying spectrum (like trained LoRAs), so rank reduction has something to keep.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .adapter import LoraAdapter, LoraModule
from .base_model import LayerShape

ATTENTION = re.compile(r"\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q|k|v|out)_proj)$")
FEED_FORWARD = re.compile(r"\.(ff\.net\.(0\.proj|2)|mlp\.fc[12])$")
PROJECTION = re.compile(r"\.(proj_in|proj_out)$")


def select_layers(layers: Mapping[str, LayerShape], *, attention: bool = True, feed_forward: bool = True,
                  projections: bool = True, conv: bool = False, other_linear: bool = False) -> dict[str, LayerShape]:
    """Pick the layers a LoRA would target: attention, feed-forward, projections, optionally conv (LoCon)."""
    chosen = {}
    for key, shape in layers.items():
        if shape.is_conv:
            take = conv
        elif ATTENTION.search(key):
            take = attention
        elif FEED_FORWARD.search(key):
            take = feed_forward
        elif PROJECTION.search(key):
            take = projections
        else:
            take = other_linear
        if take:
            chosen[key] = shape
    return chosen


def random_module(shape: LayerShape, rank: int, alpha: float, *, decay: float = 0.8, mid: bool = False,
                  generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> LoraModule:
    """A random module whose ``up @ down`` has singular values decaying by ``decay`` per index."""
    rank = min(rank, shape.out_features, shape.in_features * (1 if shape.kernel_size is None else shape.kernel_size[0] * shape.kernel_size[1]))
    spectrum = decay ** torch.arange(rank, dtype=torch.float32)
    up = torch.randn(shape.out_features, rank, generator=generator) * spectrum / shape.out_features ** 0.5
    if shape.kernel_size is None:
        down = torch.randn(rank, shape.in_features, generator=generator) / shape.in_features ** 0.5
        return LoraModule(down.to(dtype), up.to(dtype), alpha)
    kh, kw = shape.kernel_size
    up4 = up.reshape(shape.out_features, rank, 1, 1).to(dtype)
    if mid and (kh, kw) != (1, 1):
        down = torch.randn(rank, shape.in_features, 1, 1, generator=generator) / shape.in_features ** 0.5
        mid_t = torch.randn(rank, rank, kh, kw, generator=generator) / (rank * kh * kw) ** 0.5
        return LoraModule(down.to(dtype), up4, alpha, mid=mid_t.to(dtype))
    down = torch.randn(rank, shape.in_features, kh, kw, generator=generator) / (shape.in_features * kh * kw) ** 0.5
    return LoraModule(down.to(dtype), up4, alpha)


def random_adapter(layers: Mapping[str, LayerShape], rank: int = 4, alpha: float | None = None, *, seed: int = 0,
                   architecture: str = "unknown", mid: bool = False, dtype: torch.dtype = torch.float32,
                   conv_rank: int | None = None) -> LoraAdapter:
    """A random adapter over ``layers`` (see :func:`select_layers`); alpha defaults to rank / 2."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for key, shape in layers.items():
        r = conv_rank if (shape.is_conv and conv_rank) else rank
        a = alpha if alpha is not None else r / 2
        modules[key] = random_module(shape, r, a, mid=mid, generator=generator, dtype=dtype)
    return LoraAdapter(modules, architecture)
