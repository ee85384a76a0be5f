"""Translate UNet paths between diffusers names and Stability's SGM (original LDM) names.

SGM numbers the UNet's layers sequentially (``input_blocks.N.M``, ``middle_block.N``,
``output_blocks.N.M``) where diffusers nests them (``down_blocks.i.resnets.j``). The translation
depends only on the UNet layout — layers per block and which blocks have attention — which is
read from the diffusers UNet config, so it holds for any model built from the same classes.
Works on module paths and on parameter paths (``….weight``) alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# Inside a ResNet block SGM keeps the original sequential layers; diffusers names them.
_RESNET_SGM_TO_DIFFUSERS = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_RESNET_DIFFUSERS_TO_SGM = {v: k for k, v in _RESNET_SGM_TO_DIFFUSERS.items()}

# Modules outside the block structure.
_TOP_SGM_TO_DIFFUSERS = {
    "input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out",
}
_TOP_DIFFUSERS_TO_SGM = {v: k for k, v in _TOP_SGM_TO_DIFFUSERS.items()}

SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")


@dataclass(frozen=True)
class UNetLayout:
    """What the SGM numbering depends on: layers per down block and where attention is."""

    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: Mapping) -> UNetLayout:
        """The layout of a diffusers ``UNet2DConditionModel`` config."""
        layers = config.get("layers_per_block", 2)
        if not isinstance(layers, int):
            raise ValueError("SGM names exist only for UNets with the same number of layers in every block")
        return cls(layers, tuple("CrossAttn" in t for t in config["down_block_types"]),
                   tuple("CrossAttn" in t for t in config["up_block_types"]))


def _split(path: str, prefix_pattern: str) -> tuple[re.Match, str] | None:
    match = re.match(prefix_pattern + r"(?:\.(.*))?$", path)
    return (match, match.group(match.re.groups) or "") if match else None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _map_leaf(rest: str, table: Mapping[str, str]) -> str | None:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return None


def is_sgm_path(path: str) -> bool:
    """True when a UNet path uses SGM block names."""
    return path.split(".", 1)[0] in SGM_ROOTS


def sgm_to_diffusers(path: str, layout: UNetLayout) -> str | None:
    """The diffusers path of an SGM UNet path, or None when it names nothing in this layout."""
    top = _map_leaf(path, _TOP_SGM_TO_DIFFUSERS)
    if top is not None:
        return top
    per_block = layout.layers_per_block + 1
    if parsed := _split(path, r"input_blocks\.(\d+)\.(\d+)"):
        match, rest = parsed
        n, m = int(match.group(1)), int(match.group(2))
        if n == 0:
            return None
        block, layer = divmod(n - 1, per_block)
        if block >= len(layout.down_attention):
            return None
        if layer == layout.layers_per_block:  # the downsampler closes the block
            if m != 0 or not (rest == "op" or rest.startswith("op.")):
                return None
            return _join(f"down_blocks.{block}.downsamplers.0.conv", rest[2:].lstrip("."))
        if m == 0:
            leaf = _map_leaf(rest, _RESNET_SGM_TO_DIFFUSERS)
            return None if leaf is None else _join(f"down_blocks.{block}.resnets.{layer}", leaf)
        if m == 1 and layout.down_attention[block]:
            return _join(f"down_blocks.{block}.attentions.{layer}", rest)
        return None
    if parsed := _split(path, r"middle_block\.(\d+)"):
        match, rest = parsed
        n = int(match.group(1))
        if n == 1:
            return _join("mid_block.attentions.0", rest)
        if n in (0, 2):
            leaf = _map_leaf(rest, _RESNET_SGM_TO_DIFFUSERS)
            return None if leaf is None else _join(f"mid_block.resnets.{n // 2}", leaf)
        return None
    if parsed := _split(path, r"output_blocks\.(\d+)\.(\d+)"):
        match, rest = parsed
        n, m = int(match.group(1)), int(match.group(2))
        block, layer = divmod(n, per_block)
        if block >= len(layout.up_attention):
            return None
        has_attention = layout.up_attention[block]
        upsampler_slot = 2 if has_attention else 1
        if m == 0:
            leaf = _map_leaf(rest, _RESNET_SGM_TO_DIFFUSERS)
            return None if leaf is None else _join(f"up_blocks.{block}.resnets.{layer}", leaf)
        if m == 1 and has_attention:
            return _join(f"up_blocks.{block}.attentions.{layer}", rest)
        is_last_block = block == len(layout.up_attention) - 1
        if (m == upsampler_slot and layer == layout.layers_per_block and not is_last_block
                and (rest == "conv" or rest.startswith("conv."))):
            return _join(f"up_blocks.{block}.upsamplers.0", rest)
        return None
    return None


def diffusers_to_sgm(path: str, layout: UNetLayout) -> str | None:
    """The SGM path of a diffusers UNet path, or None when SGM has no such module."""
    top = _map_leaf(path, _TOP_DIFFUSERS_TO_SGM)
    if top is not None:
        return top
    per_block = layout.layers_per_block + 1
    if parsed := _split(path, r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)"):
        match, rest = parsed
        block, kind, layer = int(match.group(1)), match.group(2), int(match.group(3))
        if kind == "downsamplers":
            if layer != 0 or not (rest == "conv" or rest.startswith("conv.")):
                return None
            return _join(f"input_blocks.{1 + block * per_block + layout.layers_per_block}.0.op", rest[4:].lstrip("."))
        n = 1 + block * per_block + layer
        if kind == "attentions":
            return _join(f"input_blocks.{n}.1", rest)
        leaf = _map_leaf(rest, _RESNET_DIFFUSERS_TO_SGM)
        return None if leaf is None else _join(f"input_blocks.{n}.0", leaf)
    if parsed := _split(path, r"mid_block\.(resnets|attentions)\.(\d+)"):
        match, rest = parsed
        kind, layer = match.group(1), int(match.group(2))
        if kind == "attentions":
            return _join("middle_block.1", rest) if layer == 0 else None
        leaf = _map_leaf(rest, _RESNET_DIFFUSERS_TO_SGM)
        return None if leaf is None or layer > 1 else _join(f"middle_block.{2 * layer}", leaf)
    if parsed := _split(path, r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)"):
        match, rest = parsed
        block, kind, layer = int(match.group(1)), match.group(2), int(match.group(3))
        if block >= len(layout.up_attention):
            return None
        if kind == "upsamplers":
            slot = 2 if layout.up_attention[block] else 1
            return _join(f"output_blocks.{block * per_block + layout.layers_per_block}.{slot}", rest)
        n = block * per_block + layer
        if kind == "attentions":
            return _join(f"output_blocks.{n}.1", rest)
        leaf = _map_leaf(rest, _RESNET_DIFFUSERS_TO_SGM)
        return None if leaf is None else _join(f"output_blocks.{n}.0", leaf)
    return None
