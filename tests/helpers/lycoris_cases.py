"""Adapters mixing every module kind, over real layer keys, for the LyCORIS/DoRA tests."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from loralib.adapter import LoraAdapter
from loralib.layers import LayerShape
from loralib.lycoris.kinds import dora
from loralib.lycoris.synthetic import random_full, random_loha, random_lokr, random_norm
from loralib.synthetic import random_module

KINDS = ("lora", "loha", "lokr", "full", "dora", "loha-tucker", "lokr-full", "dora-lokr", "dora-in")


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    """Assert equal shapes and ``‖a − b‖ ≤ tol · ‖b‖`` (in float64)."""
    a, b = a.double(), b.double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert float((a - b).norm()) <= tol * max(float(b.norm()), 1e-12), float((a - b).norm() / b.norm())


def has_bias(key: str) -> bool:
    """Whether an SD layer has a bias: all but the UNet's attention q/k/v projections."""
    return re.search(r"attn[12]\.to_[qkv]$", key) is None


def make_module(kind: str, shape: LayerShape, generator: torch.Generator, base: torch.Tensor | None = None,
                bias: bool = True):
    """One module of ``kind`` for a layer of ``shape`` (DoRA magnitudes near ``base``'s norms)."""
    if kind == "lora":
        return random_module(shape, 4, 2.0, generator=generator)
    if kind == "loha":
        return random_loha(shape, 3, 1.5, generator=generator)
    if kind == "loha-tucker":
        return random_loha(shape, 3, 1.5, tucker=True, generator=generator)
    if kind == "lokr":
        return random_lokr(shape, 2, 3.0, generator=generator)
    if kind == "lokr-full":
        return random_lokr(shape, 2, 3.0, full=True, generator=generator)
    if kind == "full":
        return random_full(shape, bias=bias, generator=generator)
    inner = random_lokr(shape, 2, 3.0, generator=generator) if kind == "dora-lokr" else \
        random_module(shape, 4, 2.0, generator=generator)
    flat = base.reshape(shape.out_features, -1).float()
    on_out = kind != "dora-in"  # LyCORIS' default (wd_on_output) normalises per output row
    norms = flat.norm(dim=1).reshape(-1, 1) if on_out else \
        flat.reshape(shape.out_features, shape.in_features, -1).transpose(0, 1).reshape(shape.in_features, -1).norm(dim=1)
    norms = norms.reshape(-1, 1) if on_out else norms.reshape(1, -1)
    magnitude = norms * (1 + 0.2 * torch.rand(norms.shape, generator=generator))
    if shape.kernel_size is not None:
        magnitude = magnitude.reshape(*magnitude.shape, 1, 1)
    return dora(inner, magnitude, "lycoris")


def mixed_adapter(layers: Mapping[str, LayerShape], *, base: Mapping[str, torch.Tensor] | None = None,
                  norms: Mapping[str, int] | None = None, kinds: tuple[str, ...] = KINDS, seed: int = 0,
                  architecture: str = "unknown") -> LoraAdapter:
    """Modules of the given kinds in turn over ``layers`` (DoRA only where ``base`` has the weight;
    Tucker kinds only on k×k convs), plus norm modules for ``norms`` (key → width)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for i, (key, shape) in enumerate(layers.items()):
        kind = kinds[i % len(kinds)]
        if kind.startswith("dora") and (base is None or key not in base):
            kind = "lora"
        if kind == "loha-tucker" and (shape.kernel_size is None or tuple(shape.kernel_size) == (1, 1)):
            kind = "loha"
        modules[key] = make_module(kind, shape, generator, None if base is None else base.get(key), has_bias(key))
    for key, width in (norms or {}).items():
        modules[key] = random_norm(width, generator=generator)
    return LoraAdapter(modules, architecture)
