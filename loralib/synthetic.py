"""Random adapters shaped like a real model's layers, for tests, benchmarks and the demo.

Factors have a decaying spectrum (like trained LoRAs), so rank reduction has something to keep.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .adapter import LoraAdapter, LoraModule
from .layers import LayerShape, select_layers

__all__ = ["random_adapter", "random_module", "select_layers"]

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
    """A random adapter over ``layers`` (see :func:`loralib.layers.select_layers`); alpha defaults to rank / 2."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for key, shape in layers.items():
        r = conv_rank if (shape.is_conv and conv_rank) else rank
        a = alpha if alpha is not None else r / 2
        modules[key] = random_module(shape, r, a, mid=mid, generator=generator, dtype=dtype)
    return LoraAdapter(modules, architecture)
