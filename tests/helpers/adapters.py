"""Random adapters shaped like the tiny and full-size models, with varied ranks and alphas."""

from __future__ import annotations

import torch

from loralib.adapter import LoraAdapter
from loralib.base_model import LayerShape
from loralib.synthetic import random_adapter

ALPHAS = (1.0, 2.5, 4.0, 0.75, 3.0)


def varied_adapter(layers: dict[str, LayerShape], *, architecture: str, seed: int = 0, rank: int = 4,
                   conv_rank: int = 2, mid: bool = False, dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """A random adapter whose modules do not all share one rank and one alpha (so PEFT patterns are needed)."""
    adapter = random_adapter(layers, rank=rank, seed=seed, architecture=architecture, mid=mid, dtype=dtype,
                             conv_rank=conv_rank)
    for i, module in enumerate(adapter.modules.values()):
        module.alpha = ALPHAS[i % len(ALPHAS)]
    return adapter


def assert_same_factors(a: LoraAdapter, b: LoraAdapter) -> None:
    """Bit-identical factors and identical alphas on the same module keys."""
    assert set(a.modules) == set(b.modules)
    for key, module in a.modules.items():
        other = b.modules[key]
        assert torch.equal(module.down, other.down), key
        assert torch.equal(module.up, other.up), key
        assert module.alpha == other.alpha, key
        assert (module.mid is None) == (other.mid is None), key
        if module.mid is not None:
            assert torch.equal(module.mid, other.mid), key


def assert_same_deltas(a: LoraAdapter, b: LoraAdapter, atol: float = 1e-6) -> None:
    """Equal ΔW on every module (for conversions that fold factors, such as lora_mid)."""
    assert set(a.modules) == set(b.modules)
    for key, module in a.modules.items():
        assert torch.allclose(module.delta(), b.modules[key].delta(), atol=atol, rtol=0), key
