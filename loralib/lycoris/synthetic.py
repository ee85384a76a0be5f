"""Random LyCORIS adapters laid out as LyCORIS lays them out, for tests, benchmarks and the demo.

Factor shapes follow LyCORIS' own choices: LoKr splits each side of the weight into two factors
as close to its square root as the dimension allows (``factor=-1``) or with the smaller one at
most ``factor``, keeps ``W1`` full unless asked to decompose both, and decomposes ``W2`` while the
rank is below half its size; convolutions without a Tucker core flatten input and kernel.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..adapter import LoraAdapter
from ..layers import LayerShape
from .kinds import FullModule, LohaModule, LokrModule, NormModule
from .shapes import factorization


def _randn(*shape: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * scale


def random_loha(shape: LayerShape, rank: int, alpha: float | None = None, *, tucker: bool = False,
                generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> LohaModule:
    """A random LoHa module for a layer of ``shape`` (Tucker cores for a k×k conv when ``tucker``)."""
    generator = generator or torch.Generator().manual_seed(0)
    out, inputs, kernel = shape.out_features, shape.in_features, shape.kernel_size
    spatial = kernel is not None and tuple(kernel) != (1, 1)
    g = lambda *s, scale=1.0: _randn(*s, generator=generator, scale=scale).to(dtype)  # noqa: E731
    if tucker and spatial:
        kh, kw = kernel
        return LohaModule(g(rank, out, scale=out ** -0.5), g(rank, inputs, scale=inputs ** -0.5),
                          g(rank, out, scale=out ** -0.5), g(rank, inputs, scale=inputs ** -0.5), alpha,
                          t1=g(rank, rank, kh, kw, scale=(rank * kh * kw) ** -0.5),
                          t2=g(rank, rank, kh, kw, scale=(rank * kh * kw) ** -0.5))
    flat = inputs * (kernel[0] * kernel[1] if kernel else 1)
    return LohaModule(g(out, rank, scale=out ** -0.25), g(rank, flat, scale=flat ** -0.25),
                      g(out, rank, scale=out ** -0.25), g(rank, flat, scale=flat ** -0.25), alpha,
                      kernel_size_hint=tuple(kernel) if kernel else None)


def random_lokr(shape: LayerShape, rank: int, alpha: float | None = None, *, factor: int = -1,
                decompose_both: bool = False, full: bool = False, tucker: bool = False,
                generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> LokrModule:
    """A random LoKr module shaped as LyCORIS shapes it for a layer of ``shape``."""
    generator = generator or torch.Generator().manual_seed(0)
    out, inputs, kernel = shape.out_features, shape.in_features, shape.kernel_size
    spatial = kernel is not None and tuple(kernel) != (1, 1)
    g = lambda *s, scale=1.0: _randn(*s, generator=generator, scale=scale).to(dtype)  # noqa: E731
    (a, c), (b, d) = factorization(out, factor), factorization(inputs, factor)
    parts: dict[str, torch.Tensor] = {}
    if decompose_both and not full and rank < max(a, b) / 2:
        parts.update(w1_a=g(a, rank, scale=a ** -0.5), w1_b=g(rank, b, scale=rank ** -0.5))
    else:
        parts["w1"] = g(a, b, scale=(a * b) ** -0.25)
    kh, kw = kernel if kernel else (1, 1)
    if full or rank >= max(c, d) / 2:
        parts["w2"] = g(c, d, kh, kw, scale=(c * d * kh * kw) ** -0.25) if kernel else g(c, d, scale=(c * d) ** -0.25)
    elif tucker and spatial:
        parts.update(w2_a=g(rank, c, scale=c ** -0.5), w2_b=g(rank, d, scale=d ** -0.5),
                     t2=g(rank, rank, kh, kw, scale=(rank * kh * kw) ** -0.5))
    else:
        parts.update(w2_a=g(c, rank, scale=c ** -0.5), w2_b=g(rank, d * kh * kw, scale=(d * kh * kw) ** -0.5))
    return LokrModule(**parts, alpha=alpha, kernel_size_hint=(kh, kw) if kernel else None)


def random_full(shape: LayerShape, *, bias: bool = False, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> FullModule:
    """A random full-rank difference (with a bias difference when ``bias``)."""
    generator = generator or torch.Generator().manual_seed(0)
    dims = (shape.out_features, shape.in_features, *(shape.kernel_size or ()))
    diff = _randn(*dims, generator=generator, scale=0.01).to(dtype)
    diff_b = _randn(shape.out_features, generator=generator, scale=0.01).to(dtype) if bias else None
    return FullModule(diff, diff_b)


def random_norm(width: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> NormModule:
    """A random norm-layer difference (``w_norm`` and ``b_norm``)."""
    generator = generator or torch.Generator().manual_seed(0)
    return NormModule(_randn(width, generator=generator, scale=0.01).to(dtype),
                      _randn(width, generator=generator, scale=0.01).to(dtype))


def random_lycoris_adapter(layers: Mapping[str, LayerShape], kind: str, rank: int = 8, alpha: float | None = None, *,
                           seed: int = 0, architecture: str = "unknown", dtype: torch.dtype = torch.float32,
                           **options) -> LoraAdapter:
    """A random adapter of one kind (``loha`` or ``lokr``; ``options`` go to :func:`random_loha` /
    :func:`random_lokr`) over ``layers``."""
    generator = torch.Generator().manual_seed(seed)
    make = {"loha": random_loha, "lokr": random_lokr}[kind]
    modules = {key: make(shape, rank, alpha, generator=generator, dtype=dtype, **options) for key, shape in layers.items()}
    return LoraAdapter(modules, architecture)
