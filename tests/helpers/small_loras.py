"""Small, valid kohya LoRA files written with the standard library (no torch), for catalog tests and benchmarks.

Each file adapts a few SD1.5 UNet attention layers at rank 1 (F16, random factors from a seed),
so thousands can be written in a fraction of a second and every seed gives different hashes.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

# (kohya module name, in_features, out_features): SD1.5 layers; attn2 to_k/to_v read 768-wide text.
SD1_MODULES = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, 320),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", 768, 320),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", 320, 320),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v", 320, 320),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", 320, 320),
]


def sd1_attention_layers(count: int = 6) -> dict:
    """Shapes of a few real SD1.5 UNet attention layers, keyed as loralib keys them (for ``random_adapter``).

    Written out instead of built from the full model, which would import diffusers (seconds).
    """
    from loralib.base_model import LayerShape

    layers = {}
    for name, n_in, n_out in SD1_MODULES[:count]:
        path = name.removeprefix("lora_unet_").replace("down_blocks_0_attentions_0_transformer_blocks_0_", "")
        module = path.replace("to_out_0", "to_out.0").replace("_to_", ".to_")
        layers[f"unet.down_blocks.0.attentions.0.transformer_blocks.0.{module}"] = LayerShape(n_out, n_in, None)
    return layers


# Clearing bit 6 of every byte keeps each F16's exponent below 16: finite values under 2 in magnitude.
_FINITE_F16 = bytes(b & 0xBF for b in range(256))


def small_lora_bytes(seed: int, *, modules: int = 4, rank: int = 1, metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a kohya safetensors file with ``modules`` rank-``rank`` modules and random, finite F16 factors."""
    rnd = random.Random(seed)
    header: dict = {}
    blobs, offset = [], 0
    for name, n_in, n_out in SD1_MODULES[:modules]:
        for suffix, shape in ((".lora_down.weight", [rank, n_in]), (".lora_up.weight", [n_out, rank]), (".alpha", [])):
            data = rnd.randbytes(2 * shape[0] * shape[1]).translate(_FINITE_F16) if shape else struct.pack("<e", float(rank))
            header[name + suffix] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + len(data)]}
            blobs.append(data)
            offset += len(data)
    header["__metadata__"] = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                              "ss_network_alpha": str(rank), "ss_base_model_version": "sd_v1", **(metadata or {})}
    raw = json.dumps(header, ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def write_small_loras(folder: Path, count: int, *, start: int = 0, prefix: str = "lora") -> list[Path]:
    """Write ``count`` different small LoRA files into ``folder`` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(start, start + count):
        path = folder / f"{prefix}_{seed:05d}.safetensors"
        path.write_bytes(small_lora_bytes(seed))
        paths.append(path)
    return paths
