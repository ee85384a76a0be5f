"""Whole-process memory and time of ``lorareg extract`` on two full-size SDXL single-file checkpoints.

Issue 14's goal: extracting a LoRA from two SDXL checkpoints as A1111/ComfyUI users hold them
(about 6.9 GB each, fp16, ``model.diffusion_model.`` + ``conditioner.embedders.*`` +
``first_stage_model.`` names) runs within 8 GB of RAM (peak RSS); users report more than 40 GB
with today's tools.

The two checkpoints are written once into ``--cache`` (default ``~/.cache/lorareg-bench/extract``)
and reused. Every tensor name and shape is the real one: the UNet, both text encoders and the VAE
are built on torch's ``meta`` device from the configs lorareg already carries
(:data:`loralib.architectures.SDXL`; the VAE from SDXL's published VAE config), and renamed to the
original layout (SGM UNet names, OpenCLIP's stacked ``in_proj_weight``; the VAE keeps diffusers'
names under ``first_stage_model.``, which extract never reads). The base holds random weights
(std 0.02); the tuned model is the base plus small noise (std 2e-4) on every 2-D weight of the
UNet and text encoders, plus a known rank-8 change (Frobenius norm 5× the noise's) on every third
of them. Both files are streamed to disk one tensor at a time, so building them needs little memory.

Measured, each as a new process, alternating, page cache warm (both files read once first):

- ``python -m lorareg extract BASE TUNED -o OUT --rank 32`` (catalog registration and all);
- the I/O floor: reading both files tensor by tensor with safetensors' ``safe_open``.

Wall time, CPU time (user + system) and peak RSS (``ru_maxrss`` from ``os.wait4``) of each child.
This script imports neither torch nor lorareg (Linux carries a parent's peak RSS into a child's
``ru_maxrss`` across fork and exec); the files are built and the result checked in child
processes. After the runs a child compares the extracted LoRA with the files' own differences on
a few changed layers: its error against the optimal rank-32 error (Eckart–Young, from the exact
singular values), which is 1.00 for the best possible extraction.

``--small`` keeps every 1-D tensor (so every block's names are there) and every 8th larger one:
two files of about 1.4 GB, for a quick check of the script.

    .venv/bin/python benchmarks/extract_memory.py [--repeats 1] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from processes import ROOT, load, run_child, warm

RANK = 32
GOAL_BYTES = 8 * 10**9  # issue 14: within 8 GB of RAM
FLOOR = """\
import sys
from safetensors import safe_open
for path in sys.argv[1:]:
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            f.get_tensor(name)
"""
# SDXL's VAE (madebyollin/sdxl-vae-fp16-fix and the one in sd_xl_base_1.0: AutoencoderKL, 4 latent channels).
SDXL_VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
                   "block_out_channels": (128, 256, 512, 512),
                   "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
BASE_STD, NOISE_STD, CHANGE_RANK, CHANGE_EVERY = 0.02, 2e-4, 8, 3


# ---------------------------------------------------------------------------------------------
# Building the checkpoints (in a child process: this one imports torch)


def checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of a full-size SDXL single-file checkpoint in the original layout: name -> shape."""
    import diffusers
    import torch
    import transformers

    from loralib.architectures import SDXL, TEXT_ENCODER, TEXT_ENCODER_2
    from loralib.naming.sgm import UNetLayout, diffusers_to_sgm

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SDXL.denoiser_config)
        clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SDXL.text_encoders[TEXT_ENCODER]))
        clip_g = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**SDXL.text_encoders[TEXT_ENCODER_2]))
        vae = diffusers.AutoencoderKL(**SDXL_VAE_CONFIG)
    shapes: dict[str, tuple[int, ...]] = {}
    layout = UNetLayout.from_config(dict(unet.config))
    for name, tensor in unet.state_dict().items():
        sgm = diffusers_to_sgm(name, layout)
        if sgm is None:
            raise SystemExit(f"no SGM name for the UNet's {name}")
        shapes["model.diffusion_model." + sgm] = tuple(tensor.shape)
    for name, tensor in clip_l.state_dict().items():
        if not name.endswith("position_ids"):
            shapes["conditioner.embedders.0.transformer." + name] = tuple(tensor.shape)
    g = {k.removeprefix("text_model."): tuple(v.shape) for k, v in clip_g.state_dict().items()}
    prefix = "conditioner.embedders.1.model."
    layers = sorted({int(k.split(".")[2]) for k in g if k.startswith("encoder.layers.")})
    for i in layers:
        source, target = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        q_weight, q_bias = g[source + "self_attn.q_proj.weight"], g[source + "self_attn.q_proj.bias"]
        shapes[target + "attn.in_proj_weight"] = (3 * q_weight[0], q_weight[1])
        shapes[target + "attn.in_proj_bias"] = (3 * q_bias[0],)
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for kind in ("weight", "bias"):
                shapes[target + f"{theirs}.{kind}"] = g[source + f"{ours}.{kind}"]
    shapes[prefix + "ln_final.weight"] = g["final_layer_norm.weight"]
    shapes[prefix + "ln_final.bias"] = g["final_layer_norm.bias"]
    shapes[prefix + "token_embedding.weight"] = g["embeddings.token_embedding.weight"]
    shapes[prefix + "positional_embedding"] = g["embeddings.position_embedding.weight"]
    width = g["text_projection.weight"]
    shapes[prefix + "text_projection"] = (width[1], width[0])
    for name, tensor in vae.state_dict().items():
        shapes["first_stage_model." + name] = tuple(tensor.shape)
    return shapes


def is_changed(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a fine-tune changes this tensor here: 2-D weights of the UNet and text encoders."""
    return (len(shape) == 2 and name.startswith(("model.diffusion_model.", "conditioner."))
            and "embedding" not in name and name.endswith("weight"))


def write_checkpoints(folder: Path, small: bool) -> None:
    """Write ``base.safetensors`` and ``tuned.safetensors`` into ``folder``, one tensor at a time."""
    import math

    import torch

    shapes = checkpoint_shapes()
    if small:
        shapes = {n: s for i, (n, s) in enumerate(shapes.items()) if len(s) == 1 or i % 8 == 0}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    folder.mkdir(parents=True, exist_ok=True)
    targets = {kind: folder / f"{kind}.safetensors" for kind in ("base", "tuned")}
    temporaries = {kind: path.with_suffix(".partial") for kind, path in targets.items()}
    generator = torch.Generator().manual_seed(0)
    changed = []
    with open(temporaries["base"], "wb") as base_file, open(temporaries["tuned"], "wb") as tuned_file:
        for kind, f in (("base", base_file), ("tuned", tuned_file)):
            text = json.dumps({"__metadata__": {"format": "pt", "lorareg_bench": kind}, **header}).encode()
            text += b" " * (-len(text) % 8)
            f.write(len(text).to_bytes(8, "little") + text)
        for count, (name, shape) in enumerate(shapes.items()):
            base = torch.randn(shape, generator=generator) * BASE_STD
            base_file.write(base.half().numpy().tobytes())
            if is_changed(name, shape):
                tuned = base + torch.randn(shape, generator=generator) * NOISE_STD
                if len(changed) % CHANGE_EVERY == 0:
                    tuned += low_rank_change(shape, generator)
                changed.append(name)
                tuned_file.write(tuned.half().numpy().tobytes())
            else:
                tuned_file.write(base.half().numpy().tobytes())
            if count % 200 == 0:
                print(f"  {count}/{len(shapes)} tensors", flush=True)
    for kind in targets:
        temporaries[kind].rename(targets[kind])


def low_rank_change(shape: tuple[int, ...], generator) -> object:
    """A rank-8 matrix with decaying singular values whose Frobenius norm is 5× that of the noise."""
    import torch

    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, CHANGE_RANK, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, CHANGE_RANK, generator=generator))
    s = 0.7 ** torch.arange(CHANGE_RANK, dtype=torch.float32)
    s *= 5 * NOISE_STD * (m * n) ** 0.5 / float(s.norm())
    return (u * s) @ v.T


CHECK = """\
import sys, torch
import loralib
from loralib.compose.model_weights import ModelWeights
base_path, tuned_path, output, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
adapter = loralib.load(output)
keys = sorted(adapter.modules)
picked = keys[:: max(1, len(keys) // 6)][:6]
worst = 0.0
with ModelWeights.open(base_path) as base, ModelWeights.open(tuned_path) as tuned:
    for key in picked:
        difference = tuned.read(key).float() - base.read(key).float()
        module = adapter.modules[key]
        extracted = (module.up.float().flatten(1) @ module.down.float().flatten(1)) * module.scale
        error = float((extracted - difference).norm())
        s = torch.linalg.svdvals(difference.double())
        optimum = float(s[rank:].norm())
        worst = max(worst, error / optimum)
        print(f"  {key}: error {error:.4g}, optimal rank-{rank} error {optimum:.4g}, ratio {error / optimum:.4f}")
print(f"  worst ratio to the optimum over {len(picked)} layers: {worst:.4f} ({len(keys)} modules extracted)")
"""


# ---------------------------------------------------------------------------------------------
# Measuring (this process: no torch)


def build(cache: Path, small: bool) -> tuple[Path, Path]:
    """The two checkpoints in ``cache`` (written by a child process on first use)."""
    folder = cache / ("extract-small" if small else "extract")
    base, tuned = folder / "base.safetensors", folder / "tuned.safetensors"
    if not (base.exists() and tuned.exists()):
        print(f"building the checkpoints in {folder} ...", flush=True)
        command = [sys.executable, __file__, "--build", str(folder)] + (["--small"] if small else [])
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return base, tuned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of extract and its floor")
    parser.add_argument("--small", action="store_true", help="every 8th large tensor only (a quick check)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lorareg-bench",
                        help="where the checkpoints are built once and kept")
    parser.add_argument("--no-check", action="store_true", help="skip the check of the result against the optimum")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # internal: write the checkpoints here
    args = parser.parse_args()
    if args.build:
        write_checkpoints(args.build, args.small)
        return
    from importlib.metadata import version

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, torch {version('torch')}, "
          f"python {platform.python_version()}; load average {load()}")
    base, tuned = build(args.cache, args.small)
    print(f"inputs: {base} {base.stat().st_size / 1e9:.2f} GB, {tuned} {tuned.stat().st_size / 1e9:.2f} GB")
    work = Path(tempfile.mkdtemp(prefix="lorareg-extract-"))
    env = {**os.environ, "LORAREG_HOME": str(work / "home"), "PYTHONPATH": str(ROOT)}
    output = work / "extracted.safetensors"
    extract = [sys.executable, "-m", "lorareg", "extract", str(base), str(tuned), "-o", str(output),
               "--rank", str(RANK), "--force"]
    floor = [sys.executable, "-c", FLOOR, str(base), str(tuned)]
    runs: dict[str, list[tuple[float, float, int]]] = {"extract": [], "floor": []}
    try:
        warm((base, tuned))
        for _ in range(args.repeats):
            runs["floor"].append(run_child(floor, env))
            runs["extract"].append(run_child(extract, env))
            print(f"  extract {runs['extract'][-1][0]:.1f} s, floor {runs['floor'][-1][0]:.1f} s "
                  f"(load average {load()})", flush=True)
        ours, io = ([statistics.median(r[i] for r in runs[label]) for i in range(3)] for label in ("extract", "floor"))
        print(f"\nmedian of {args.repeats} alternating run(s) each; floor = safe_open + get_tensor of every tensor "
              "of both files, a new process")
        print(f"{'':<10}{'wall':>10}{'CPU':>10}{'peak RSS':>12}")
        print(f"{'extract':<10}{ours[0]:>9.1f}s{ours[1]:>9.1f}s{ours[2] / 1e9:>9.2f} GB")
        print(f"{'floor':<10}{io[0]:>9.1f}s{io[1]:>9.1f}s{io[2] / 1e9:>9.2f} GB")
        print(f"{'ratio':<10}{ours[0] / io[0]:>9.2f}x{ours[1] / io[1]:>9.2f}x{ours[2] / io[2]:>9.2f}x")
        verdict = "within" if ours[2] <= GOAL_BYTES else "OVER"
        print(f"peak RSS of extract: {ours[2] / 1e9:.2f} GB, {verdict} the 8 GB goal")
        print("every run (wall s / CPU s / peak RSS GB): " + "; ".join(
            f"{label} " + ", ".join(f"{t:.1f}/{c:.1f}/{m / 1e9:.2f}" for t, c, m in runs[label]) for label in runs))
        if not args.no_check:
            print("the extracted LoRA against the files' own differences:")
            subprocess.run([sys.executable, "-c", CHECK, str(base), str(tuned), str(output), str(RANK)],
                           check=True, cwd=ROOT, env=env)
        print(f"load average at the end: {load()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
