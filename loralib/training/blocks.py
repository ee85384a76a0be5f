"""Block-wise rank, alpha and learning rate of the UNet's LoRA layers, with kohya's semantics.

sd-scripts numbers the UNet's blocks as the original (SGM) UNet does and takes one value per
block in ``block_dims``/``block_alphas``/``conv_block_dims``/``conv_block_alphas``, and
learning-rate factors per down, middle and up block in ``down_lr_weight``/``mid_lr_weight``/
``up_lr_weight``:

- SD1/SD2, 25 blocks: 0-11 the input blocks (0 is ``conv_in``, which has no LoRA), 12 the middle
  block, 13-24 the output blocks; 12 + 1 + 12 learning-rate factors.
- SDXL, 23 blocks: 0 the time embedding, 1-9 the input blocks, 10-12 the middle block's three
  parts, 13-21 the output blocks, 22 the output layer; 9 + 3 + 9 learning-rate factors (the time
  embedding and output layer keep factor 1).

A rank of 0, or a learning-rate factor of 0, leaves a block without LoRA layers.

Flux.1 and SD3 have no UNet blocks: they are chosen by sd-scripts' Flux keys (:class:`TransformerBlocks`):
``train_blocks`` (``all``, ``double`` or ``single``), ``train_double_block_indices`` (Flux.1's
double blocks, diffusers' ``transformer_blocks.N``; SD3's joint blocks) and
``train_single_block_indices`` (Flux.1's single blocks, ``single_transformer_blocks.N``).
Their layers get ranks per kind with sd-scripts' Flux/SD3 ``network_args`` (:data:`KIND_KEYS`):
``img_attn_dim``, ``txt_attn_dim``, ``img_mlp_dim``, ``txt_mlp_dim``, ``img_mod_dim``,
``txt_mod_dim``, ``single_dim``, ``single_mod_dim`` (Flux.1) and ``x_attn_dim``,
``context_attn_dim``, ``x_mlp_dim``, ``context_mlp_dim``, ``x_mod_dim``, ``context_mod_dim``
(SD3); a rank of 0 leaves the kind out, the modulation layers are trained only when their rank is
given (sd-scripts trains them at ``network_dim`` by default; lorareg's targets leave them out).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .config import TrainConfig, parse_indices

_OUTER = re.compile(r"^unet\.(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_MIDDLE = re.compile(r"^unet\.mid_block\.(resnets|attentions)\.(\d+)\.")


@dataclass(frozen=True)
class BlockLayout:
    """How one architecture's UNet is divided into kohya's blocks."""

    blocks: int          # values in block_dims
    outer: int           # values in down_lr_weight and up_lr_weight
    middle: int          # values in mid_lr_weight
    input_offset: int    # block number of the SGM input block 0
    split_middle: bool   # the middle block counts as three blocks (resnet, attention, resnet)

    def block(self, key: str) -> int | None:
        """The block number of an internal UNet key (None: a layer outside the numbered blocks)."""
        match = _OUTER.match(key)
        if match:
            side, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
            part = 2 if kind.endswith("samplers") else j
            if side == "down":  # SGM input block 1 + 3i + part
                return self.input_offset + 1 + 3 * i + part
            return self.input_offset + self.outer + self.middle + 3 * i + part  # SGM output block 3i + part
        match = _MIDDLE.match(key)
        if match:
            start = self.input_offset + self.outer
            if not self.split_middle:
                return start
            return start + (1 if match.group(1) == "attentions" else 2 * int(match.group(2)))  # resnet, attn, resnet
        return None

    def lr_weights(self, down: list[float], middle: list[float], up: list[float]) -> list[float]:
        """One learning-rate factor per block from the three lists (kohya's order)."""
        weights = down + middle + up
        return [1.0] + weights + [1.0] if self.input_offset else weights


#: kohya's block layouts by lorareg architecture.
LAYOUTS = {
    "sd1": BlockLayout(blocks=25, outer=12, middle=1, input_offset=0, split_middle=False),
    "sd2": BlockLayout(blocks=25, outer=12, middle=1, input_offset=0, split_middle=False),
    "sdxl": BlockLayout(blocks=23, outer=9, middle=3, input_offset=1, split_middle=True),
}


def _numbers(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def preset_weights(text: str, length: int) -> list[float]:
    """kohya's named learning-rate curves (``cosine``, ``sine``, ``linear``, ``reverse_linear``, ``zeros``,
    each optionally ``+base``) over ``length`` blocks, shallow to deep."""
    name, _, base_text = text.partition("+")
    base = float(base_text) if base_text else 0.0
    steps = [i / (length - 1) for i in range(length)]
    curves = {
        "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
        "sine": [math.sin(math.pi * s / 2) for s in steps],
        "linear": steps,
        "reverse_linear": list(reversed(steps)),
        "zeros": [0.0] * length,
    }
    return [value + base for value in curves[name]]


@dataclass
class BlockPlan:
    """Rank, alpha and learning-rate factor of every UNet block for one run."""

    layout: BlockLayout
    dims: list[int]
    alphas: list[float]
    conv_dims: list[int]
    conv_alphas: list[float]
    lr_weights: list[float]

    def settings(self, key: str, wide_conv: bool) -> tuple[int, float] | None:
        """``(rank, alpha)`` of the layer with internal ``key`` (rank 0: no LoRA layer; None: the defaults)."""
        block = self.layout.block(key)
        if block is None:
            return None
        if wide_conv:
            return self.conv_dims[block], self.conv_alphas[block]
        return self.dims[block], self.alphas[block]

    def lr_weight(self, key: str) -> float:
        """The learning-rate factor of the layer with internal ``key``."""
        block = self.layout.block(key)
        return 1.0 if block is None else self.lr_weights[block]


def _outer_weights(text: str | None, length: int, name: str, architecture: str) -> list[float]:
    if text is None:
        return [1.0] * length
    values = preset_weights(text, length) if text[0].isalpha() else _numbers(text)
    if len(values) > length:
        raise InvalidArgumentError(f"{name} has {len(values)} values; {architecture} has {length} such blocks",
                                   f"Give at most {length} values")
    return values + [1.0] * (length - len(values))  # kohya fills missing factors with 1


_TRANSFORMER_BLOCK = re.compile(r"^transformer\.(single_)?transformer_blocks\.(\d+)\.(.+)$")
# The kind of each layer of a block (diffusers' path within the block), by family: the config key of its rank.
_DOUBLE_KINDS = {
    "flux": ((r"attn\.(to_[qkv]|to_out\.0)", "img_attn_dim"), (r"attn\.(add_[qkv]_proj|to_add_out)", "txt_attn_dim"),
             (r"ff\.net\..+", "img_mlp_dim"), (r"ff_context\.net\..+", "txt_mlp_dim"),
             (r"norm1\.linear", "img_mod_dim"), (r"norm1_context\.linear", "txt_mod_dim")),
    "sd3": ((r"attn2?\.(to_[qkv]|to_out\.0)", "x_attn_dim"), (r"attn\.(add_[qkv]_proj|to_add_out)", "context_attn_dim"),
            (r"ff\.net\..+", "x_mlp_dim"), (r"ff_context\.net\..+", "context_mlp_dim"),
            (r"norm1\.linear", "x_mod_dim"), (r"norm1_context\.linear", "context_mod_dim")),
}
_SINGLE_KINDS = ((r"attn\.to_[qkv]|proj_mlp|proj_out", "single_dim"), (r"norm\.linear", "single_mod_dim"))
#: The per-kind rank keys of each family (sd-scripts' network_args of networks/lora_flux.py and lora_sd3.py).
KIND_KEYS = {"flux": tuple(k for _, k in _DOUBLE_KINDS["flux"] + _SINGLE_KINDS),
             "sd3": tuple(k for _, k in _DOUBLE_KINDS["sd3"])}
_MODULATION_KEYS = frozenset(k for keys in KIND_KEYS.values() for k in keys if k.endswith("_mod_dim"))


# sd-scripts' in_dims order, and the diffusers layers of each (BFL img_in, time_in, vector_in, guidance_in, txt_in).
_IN_LAYERS = (("transformer.x_embedder",), ("transformer.time_text_embed.timestep_embedder.linear_1",
                                            "transformer.time_text_embed.timestep_embedder.linear_2"),
              ("transformer.time_text_embed.text_embedder.linear_1", "transformer.time_text_embed.text_embedder.linear_2"),
              ("transformer.time_text_embed.guidance_embedder.linear_1",
               "transformer.time_text_embed.guidance_embedder.linear_2"),
              ("transformer.context_embedder",))


def in_ranks(text: str | None) -> tuple[tuple[str, int], ...]:
    """``(layer key, rank)`` of the Flux.1 input layers that ``in_dims`` trains (a rank above 0)."""
    if not text:
        return ()
    ranks = [int(v) for v in text.split(",")]
    return tuple((key, rank) for keys, rank in zip(_IN_LAYERS, ranks) for key in keys if rank > 0)


def layer_kind(key: str, family: str) -> str | None:
    """The per-kind rank key (``img_attn_dim``…) of a transformer layer's internal key, or None."""
    match = _TRANSFORMER_BLOCK.match(key)
    if match is None:
        return None
    table = _SINGLE_KINDS if match.group(1) else _DOUBLE_KINDS[family]
    return next((name for pattern, name in table if re.fullmatch(pattern, match.group(3))), None)


@dataclass(frozen=True)
class TransformerBlocks:
    """Which of a Flux.1/SD3 transformer's blocks get LoRA layers (None: every block of that kind)."""

    double: frozenset[int] | None
    single: frozenset[int] | None
    family: str = "flux"
    kind_ranks: tuple[tuple[str, int], ...] = ()  # (rank key, rank) of the kinds given
    alpha: float = 1.0
    inputs: tuple[tuple[str, int], ...] = ()  # (layer key, rank) of the input layers in_dims trains

    def settings(self, key: str, wide_conv: bool) -> tuple[int, float] | None:
        """``(0, 1.0)`` for a layer of a block left out (no LoRA layer), ``(rank, alpha)`` for a layer
        whose kind has a rank of its own, None for the default rank and alpha."""
        match = _TRANSFORMER_BLOCK.match(key)
        if match is None:
            rank = dict(self.inputs).get(key)
            return None if rank is None else (rank, self.alpha)
        chosen = self.single if match.group(1) else self.double
        if chosen is not None and int(match.group(2)) not in chosen:
            return (0, 1.0)
        rank = dict(self.kind_ranks).get(layer_kind(key, self.family) or "")
        return None if rank is None else (rank, self.alpha)

    def adds(self, key: str) -> bool:
        """True for a modulation layer that a given ``*_mod_dim`` asks to train (not a default target)."""
        if key in dict(self.inputs):
            return True
        kind = layer_kind(key, self.family)
        return kind in _MODULATION_KEYS and dict(self.kind_ranks).get(kind, 0) > 0

    def lr_weight(self, key: str) -> float:
        """Every trained block learns at the base rate."""
        return 1.0


def _transformer_blocks(config: TrainConfig, architecture: str, family: str) -> TransformerBlocks | None:
    net = config.network
    sd_keys = [name for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
                                 "down_lr_weight", "mid_lr_weight", "up_lr_weight") if getattr(net, name) is not None]
    if sd_keys:
        raise InvalidArgumentError(f"{', '.join(sd_keys)} follow kohya's UNet block layout, which {architecture} has not",
                                   "Use train_blocks, train_double_block_indices and train_single_block_indices")
    if family == "sd3" and (net.train_blocks == "single" or net.train_single_block_indices is not None):
        raise InvalidArgumentError(f"{architecture} has no single blocks (only joint blocks)",
                                   "Use train_double_block_indices for its joint blocks")
    other = KIND_KEYS["sd3" if family == "flux" else "flux"]
    foreign = [k for k in other if k not in KIND_KEYS[family] and getattr(net, k) is not None]
    if foreign:
        raise InvalidArgumentError(f"{', '.join(foreign)} name {'SD3' if family == 'flux' else 'Flux.1'} layers, which "
                                   f"{architecture} has not", f"Use {', '.join(KIND_KEYS[family])}")
    if family == "sd3" and net.in_dims is not None:
        raise InvalidArgumentError(f"in_dims names Flux.1's input layers, which {architecture} has not",
                                   "Remove in_dims")
    kinds = tuple((k, getattr(net, k)) for k in KIND_KEYS[family] if getattr(net, k) is not None)
    if net.train_blocks == "all" and net.train_double_block_indices is None and net.train_single_block_indices is None \
            and not kinds and not net.in_dims:
        return None
    double = frozenset(parse_indices(net.train_double_block_indices)) if net.train_double_block_indices else None
    single = frozenset(parse_indices(net.train_single_block_indices)) if net.train_single_block_indices else None
    if net.train_blocks == "double":
        single = frozenset()
    elif net.train_blocks == "single":
        double = frozenset()
    return TransformerBlocks(double, single, family, kinds, config.alpha, in_ranks(net.in_dims))


def plan_blocks(config: TrainConfig, architecture: str) -> BlockPlan | TransformerBlocks | None:
    """The block plan that the configuration asks for on ``architecture`` (None: no block-wise setting)."""
    from ..architectures import family_of

    net = config.network
    family = family_of(architecture)
    if family in ("flux", "sd3"):
        return _transformer_blocks(config, architecture, family)
    flux_keys = [name for name in ("train_double_block_indices", "train_single_block_indices",
                                   "in_dims", *KIND_KEYS["flux"], *KIND_KEYS["sd3"])
                 if getattr(net, name) is not None] + (["train_blocks"] if net.train_blocks != "all" else [])
    if flux_keys:
        raise InvalidArgumentError(f"{', '.join(flux_keys)} choose Flux.1/SD3 transformer blocks; {architecture} has a "
                                   "UNet", "Use block_dims and the *_lr_weight settings (kohya's UNet blocks)")
    keys = (net.block_dims, net.block_alphas, net.conv_block_dims, net.conv_block_alphas, net.down_lr_weight,
            net.mid_lr_weight, net.up_lr_weight)
    if all(value is None for value in keys):
        return None
    layout = LAYOUTS.get(architecture)
    if layout is None:
        raise InvalidArgumentError(f"block-wise ranks and learning rates for {architecture} base models are not "
                                   "available yet", "Remove the block_* and *_lr_weight settings")
    for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        value = getattr(net, name)
        if value is not None and len(value.split(",")) != layout.blocks:
            raise InvalidArgumentError(f"{name} has {len(value.split(','))} values; a {architecture} UNet has "
                                       f"{layout.blocks} blocks", "See the block table in docs/training.md")
    if net.mid_lr_weight is not None and len(net.mid_lr_weight.split(",")) > layout.middle:
        raise InvalidArgumentError(f"mid_lr_weight has {len(net.mid_lr_weight.split(','))} values; a "
                                   f"{architecture} UNet has {layout.middle} middle block(s)",
                                   f"Give at most {layout.middle} values")
    dims = [int(v) for v in net.block_dims.split(",")] if net.block_dims else [net.rank] * layout.blocks
    alphas = _numbers(net.block_alphas) if net.block_alphas else [config.alpha] * layout.blocks
    conv_dims = [int(v) for v in net.conv_block_dims.split(",")] if net.conv_block_dims else \
        [config.conv_rank] * layout.blocks
    conv_alphas = _numbers(net.conv_block_alphas) if net.conv_block_alphas else [config.conv_alpha] * layout.blocks
    middle = _numbers(net.mid_lr_weight) if net.mid_lr_weight else []
    weights = layout.lr_weights(_outer_weights(net.down_lr_weight, layout.outer, "down_lr_weight", architecture),
                                middle + [1.0] * (layout.middle - len(middle)),
                                _outer_weights(net.up_lr_weight, layout.outer, "up_lr_weight", architecture))
    for block, weight in enumerate(weights):
        if weight == 0:  # kohya: a block that does not learn gets no layers
            dims[block] = conv_dims[block] = 0
    return BlockPlan(layout, dims, alphas, conv_dims, conv_alphas, weights)
