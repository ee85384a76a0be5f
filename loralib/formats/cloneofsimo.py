"""cloneofsimo's ``lora_diffusion`` files (read only): ``unet:N:down``, ``text_encoder:N:up``.

Modules are numbered in the order lora_diffusion found them: the model's modules in
registration order (down blocks, up blocks, then the mid block), and inside each transformer
block the order of its day (``attn1``, ``ff``, ``attn2``), each attention's ``to_q``, ``to_k``,
``to_v``, ``to_out.0``; in CLIP layers ``k_proj``, ``v_proj``, ``q_proj``, ``out_proj``. Which
classes were targeted is in the metadata. Every module's shape is checked against the width
its position implies, so a file that does not follow this order is refused, never misread.
Scale is 1 (alpha = rank). Textual-inversion tokens (metadata value ``<embed>``) are kept as
embeddings.
"""

from __future__ import annotations

import re

from ..architectures import ARCHITECTURES, SD1, TEXT_ENCODER, UNET
from ..errors import CorruptFileError, UnsupportedFormatError
from ..jsontext import loads_metadata
from .base import AdapterIndex, Format, Inputs, Kind, ModuleEntry
from .source import TensorSource

CLONEOFSIMO = Kind("cloneofsimo", "cloneofsimo lora_diffusion LoRA", True)
CLONEOFSIMO_KEY = re.compile(r"^(unet|text_encoder):(\d{1,6}):(up|down)$")

EMBED_FLAG = "<embed>"
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_CLIP_ATTENTION = ("k_proj", "v_proj", "q_proj", "out_proj")


def _unet_order(config: dict, with_ff: bool) -> list[tuple[str, int, int]]:
    """(module path, in features, out features) in lora_diffusion's order."""
    widths = config["block_out_channels"]
    cross = config["cross_attention_dim"]
    layers = config["layers_per_block"]
    blocks = [(f"down_blocks.{i}.attentions.{j}", widths[i])
              for i, t in enumerate(config["down_block_types"]) if "CrossAttn" in t for j in range(layers)]
    blocks += [(f"up_blocks.{i}.attentions.{j}", widths[::-1][i])
               for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t for j in range(layers + 1)]
    blocks.append(("mid_block.attentions.0", widths[-1]))
    order = []
    for prefix, width in blocks:
        block = f"{prefix}.transformer_blocks.0"
        order += [(f"{block}.attn1.{p}", width, width) for p in _ATTENTION]
        if with_ff:
            order.append((f"{block}.ff.net.0.proj", width, 8 * width))
        order += [(f"{block}.attn2.{p}", cross if p in ("to_k", "to_v") else width, width) for p in _ATTENTION]
    return order


def _text_order(layers: int) -> list[str]:
    return [f"text_model.encoder.layers.{i}.self_attn.{p}" for i in range(layers) for p in _CLIP_ATTENTION]


def read(inputs: Inputs) -> AdapterIndex:
    """Index a lora_diffusion file, checking each numbered module against its expected shape."""
    return parse(inputs.sources[0])


def parse(source: TensorSource) -> AdapterIndex:
    """Index a lora_diffusion file, checking each numbered module against its expected shape."""
    counts = {UNET: 0, TEXT_ENCODER: 0}
    for name in source.names:
        if match := CLONEOFSIMO_KEY.match(name):
            counts[match.group(1)] = max(counts[match.group(1)], int(match.group(2)) + 1)
    missing = next((f"{part}:{i}:{f}" for part, n in counts.items() for i in range(n) for f in ("up", "down")
                    if f"{part}:{i}:{f}" not in source.shapes), None)
    if missing:
        raise CorruptFileError(f"{source.path.name} is a cloneofsimo lora_diffusion file without {missing}",
                               "The file is incomplete")
    embeddings = {n: (source, n) for n in source.names if source.metadata.get(n) == EMBED_FLAG}
    widths = [source.shapes[f"unet:{i}:down"] for i in range(counts[UNET])]
    cross = next((shape[1] for shape in widths if len(shape) == 2 and shape[1] in (768, 1024)), 768)
    arch = ARCHITECTURES["sd2" if cross == 1024 else "sd1"]
    targets = loads_metadata(source.metadata.get(UNET), [])
    with_ff = isinstance(targets, list) and "GEGLU" in targets
    unet = _unet_order(arch.unet_config, with_ff=with_ff) if counts[UNET] else []
    text = _text_order(arch.text_encoders[TEXT_ENCODER]["num_hidden_layers"]) if counts[TEXT_ENCODER] else []
    if counts[UNET] not in (0, len(unet)) or counts[TEXT_ENCODER] not in (0, len(text)):
        raise UnsupportedFormatError(
            f"{source.path.name} is a cloneofsimo lora_diffusion file with {counts[UNET]} UNet and "
            f"{counts[TEXT_ENCODER]} text-encoder modules, a layout lorareg cannot map to module names",
            f"Only the default targets on {SD1.title}/SD2.x are supported")
    entries: dict[str, ModuleEntry] = {}
    for i, (path, width_in, width_out) in enumerate(unet):
        entry = ModuleEntry(f"{UNET}.{path}", source, f"unet:{i}:down", f"unet:{i}:up")
        entry.check_shapes()
        down, up = source.shapes[entry.down], source.shapes[entry.up]
        if down[1] != width_in or up[0] != width_out:
            raise UnsupportedFormatError(
                f"{source.path.name}: cloneofsimo module unet:{i} has shape {list(up)}x{list(down)}, "
                f"but position {i} is {path} ({width_out}x{width_in}); the file does not follow lora_diffusion's order")
        entries[entry.key] = entry
    for i, path in enumerate(text):
        entry = ModuleEntry(f"{TEXT_ENCODER}.{path}", source, f"text_encoder:{i}:down", f"text_encoder:{i}:up")
        entry.check_shapes()
        entries[entry.key] = entry
    notes = [f"textual-inversion tokens {', '.join(embeddings)} are kept with the adapter"] if embeddings else []
    metadata = {k: v for k, v in source.metadata.items() if k.startswith(("ss_", "modelspec."))}
    return AdapterIndex(CLONEOFSIMO, [source], entries, metadata, embeddings, notes)


FORMAT = Format("cloneofsimo", "cloneofsimo lora_diffusion (read only)", ((CLONEOFSIMO, CLONEOFSIMO_KEY),), read)
