"""A small catalog shaped like a real collection, for the playground's tests and its documentation's screenshots.

Four kohya LoRAs (SD1 attention layers, rank 4, float16 values from a seeded normal distribution)
with kohya training metadata and caption statistics, sample images with A1111 parameters, a
preview image beside one file, a merge of two of them (recorded with its lineage, as ``lorareg
merge`` records it) and a PEFT conversion of one (the "same adapter" in another format).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.small_loras import SD1_MODULES

STYLES = {
    "pixel-art": {"tags": ["style", "retro"], "trigger": "pxl style", "color": (120, 80, 220), "title": "Pixel Art XL",
                  "captions": {"pxl style": 40, "castle": 12, "sprite": 9, "8bit": 7, "dungeon": 4, "hero": 3}},
    "watercolor": {"tags": ["style", "painting"], "trigger": "wtrclr", "color": (60, 150, 210), "title": "Soft Watercolor",
                   "captions": {"wtrclr": 30, "flowers": 10, "landscape": 8, "river": 2}},
    "cyber-city": {"tags": ["scene"], "trigger": "cybrcty", "color": (230, 60, 140), "title": "Cyber City",
                   "captions": {"cybrcty": 25, "neon": 20, "night": 15, "rain": 6}},
    "ink-sketch": {"tags": ["style"], "trigger": "inksk", "color": (40, 40, 40), "title": "Ink Sketch",
                   "captions": {"inksk": 22, "portrait": 11, "lineart": 9}},
}


def lora_file(path: Path, seed: int, *, rank: int = 4, metadata: dict[str, str] | None = None) -> Path:
    """A kohya file with 4 SD1 attention modules of rank ``rank`` and the given metadata."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, n_in, n_out in SD1_MODULES[:4]:
        tensors[f"{name}.lora_down.weight"] = (rng.standard_normal((rank, n_in)) * 0.05).astype(np.float16)
        tensors[f"{name}.lora_up.weight"] = (rng.standard_normal((n_out, rank)) * 0.05).astype(np.float16)
        tensors[f"{name}.alpha"] = np.array(float(rank), dtype=np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                            "ss_network_alpha": str(rank), **(metadata or {})})
    return path


def sample_png(path: Path, color: tuple[int, int, int], prompt: str, seed: int, size: int = 96) -> Path:
    """A gradient PNG with A1111 ``parameters`` (prompt on the first line)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    image = Image.new("RGB", (size, size))
    image.putdata([(min(255, color[0] + x), min(255, color[1] + y // 2), min(255, color[2] + (x + y) // 4))
                   for y in range(size) for x in range(size)])
    info = PngInfo()
    info.add_text("parameters", f"{prompt}\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: {seed}, Size: {size}x{size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path


def training_metadata(name: str, style: dict, seed: int) -> dict[str, str]:
    """kohya sd-scripts' ss_* keys as a real training run writes them."""
    return {"ss_output_name": name, "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
            "ss_base_model_version": "sd_v1", "ss_learning_rate": "0.0001", "ss_unet_lr": "0.0001",
            "ss_text_encoder_lr": "5e-05", "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
            "ss_lr_scheduler": "cosine", "ss_num_epochs": str(8 + seed), "ss_max_train_steps": str(1600 + 100 * seed),
            "ss_resolution": "(512, 512)", "ss_num_train_images": str(sum(style["captions"].values())),
            "ss_seed": str(seed), "ss_mixed_precision": "fp16", "ss_clip_skip": "2",
            "ss_tag_frequency": json.dumps({f"10_{name}": style["captions"]}),
            "modelspec.title": style["title"], "modelspec.trigger_phrase": style["trigger"]}


def build_demo_catalog(home: Path, folder: Path) -> dict[str, int]:
    """Fill the catalog at ``home`` with the demo collection (files under ``folder``); returns name -> entry id."""
    from loralib.compose import merge
    from loralib.formats import convert
    from lorareg.registry.catalog import Catalog
    from lorareg.registry.outputs import record_output
    from lorareg.registry.samples import sample_record

    ids: dict[str, int] = {}
    paths: dict[str, Path] = {}
    with Catalog(home) as catalog:
        for seed, (name, style) in enumerate(STYLES.items()):
            path = lora_file(folder / f"{name}.safetensors", seed + 1, metadata=training_metadata(name, style, seed))
            samples = [] if name == "cyber-city" else [
                sample_record(sample_png(folder / "samples" / f"{name}-{i}.png", style["color"],
                                         f"{style['trigger']}, a castle on a hill, {i}", 7 + i))
                for i in range(2 if name == "pixel-art" else 1)]
            if name == "cyber-city":  # a preview image beside the file, as A1111 and Civitai helpers keep them
                sample_png(folder / f"{name}.preview.png", style["color"], "preview", 1)
            entry = catalog.add(path, tags=style["tags"], triggers=[style["trigger"]], samples=samples,
                                description=f"{style['title']}: trained on {sum(style['captions'].values())} images.").entry
            ids[name], paths[name] = entry.id, path
    composition = merge([(paths["pixel-art"], 0.7), (paths["watercolor"], 0.3)])
    merged = composition.save(folder / "pixel-watercolor.safetensors", "kohya")
    ids["pixel-watercolor"] = record_output(merged, home).entry.id
    converted = convert(paths["pixel-art"], folder / "pixel-art_peft", "peft")
    ids["pixel-art_peft"] = record_output(converted, home).entry.id
    return ids
