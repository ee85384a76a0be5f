"""Which layers of a model a LoRA adapts: their shapes, and the patterns that pick them.

Training (which layers get a LoRA), extraction (which layer differences become modules) and the
random adapters of tests and benchmarks all choose layers the same way. Keys are internal keys
(:mod:`loralib.naming`); nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# SD UNets (attn1/attn2), Flux/SD3 transformers (attn, attn2, the text stream's add_*_proj), CLIP and T5.
ATTENTION = re.compile(r"\.(attn[12]?\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)|self_attn\.(q|k|v|out)_proj|"
                       r"SelfAttention\.[qkvo])$")
FEED_FORWARD = re.compile(r"\.(ff(_context)?\.net\.(0\.proj|2)|mlp\.fc[12]|proj_mlp|DenseReluDense\.(wi|wi_0|wi_1|wo))$")
PROJECTION = re.compile(r"\.(proj_in|proj_out)$")
# The adaptive-norm modulation of Flux/SD3 blocks (trainers adapt them with the rest of a block).
MODULATION = re.compile(r"\.(norm1(_context)?\.linear|norm\.linear)$")


@dataclass(frozen=True)
class LayerShape:
    """The weight shape of an adaptable layer."""

    out_features: int
    in_features: int
    kernel_size: tuple[int, int] | None  # None for Linear

    @property
    def is_conv(self) -> bool:
        """True for a Conv2d layer."""
        return self.kernel_size is not None


def select_layers(layers: Mapping[str, LayerShape], *, attention: bool = True, feed_forward: bool = True,
                  projections: bool = True, conv: bool = False, other_linear: bool = False,
                  modulation: bool = True) -> dict[str, LayerShape]:
    """Pick the layers a LoRA would target: attention, feed-forward, projections, a transformer block's
    modulation, optionally conv (LoCon)."""
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
        elif MODULATION.search(key):
            take = modulation
        else:
            take = other_linear
        if take:
            chosen[key] = shape
    return chosen
