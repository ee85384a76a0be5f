"""Benchmark: convert a full-size SDXL-shaped kohya LoRA to PEFT and back.

The adapter covers every attention, feed-forward and projection layer of the SDXL UNet and
both text encoders, rank 32, fp16, random factors. Each conversion is timed against a plain
``safetensors`` load + save of the same file in the same run (best of several repeats), so the
ratio is independent of the machine.

    .venv/bin/python benchmarks/convert.py [--repeats 7] [--rank 32]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import loralib
from loralib.base_model import full_size_layers
from loralib.formats import convert
from loralib.layers import select_layers
from loralib.synthetic import random_adapter


def timed(fn, output: Path) -> float:
    """Seconds one run of ``fn`` takes to write a fresh ``output``.

    The previous output is deleted first (untimed), so every run writes a new file as a user's
    conversion does; replacing an existing file costs extra on some filesystems.
    """
    shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink(missing_ok=True)
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="lorareg-bench-"))
    try:
        layers = select_layers(full_size_layers("sdxl"), attention=True, feed_forward=True, projections=True)
        adapter = random_adapter(layers, rank=args.rank, alpha=args.rank / 2, architecture="sdxl", dtype=torch.float16)
        source = work / "sdxl_r32.safetensors"
        loralib.save(adapter, source)
        size = source.stat().st_size
        del adapter
        print(f"SDXL-shaped kohya LoRA: {len(layers)} modules, rank {args.rank}, fp16, {size / 2**20:.1f} MiB")

        def plain() -> None:
            save_file(load_file(source), work / "plain.safetensors")

        def to_peft() -> None:
            convert(source, work / "peft", "peft")

        def back() -> None:
            convert(work / "peft", work / "back.safetensors", "kohya")

        plain()  # warm the page cache and the code paths
        to_peft()
        runs = {"plain": [], "peft": [], "back": []}
        for _ in range(args.repeats):  # interleaved, so that a busy spell of the machine hits all three
            runs["plain"].append(timed(plain, work / "plain.safetensors"))
            runs["peft"].append(timed(to_peft, work / "peft"))
            runs["back"].append(timed(back, work / "back.safetensors"))
        baseline, peft_time, back_time = (min(runs[k]) for k in ("plain", "peft", "back"))
        print(f"{'step':<34}{'seconds':>9}{'ratio':>8}")
        print(f"{'safetensors load + save (baseline)':<34}{baseline:>9.3f}{1:>8.2f}")
        print(f"{'kohya -> PEFT':<34}{peft_time:>9.3f}{peft_time / baseline:>8.2f}")
        print(f"{'PEFT -> kohya':<34}{back_time:>9.3f}{back_time / baseline:>8.2f}")
        print(f"{'round trip vs 2 x baseline':<34}{peft_time + back_time:>9.3f}{(peft_time + back_time) / (2 * baseline):>8.2f}")
        print(f"goal: each conversion <= 1.5 x baseline -> {'met' if max(peft_time, back_time) / baseline <= 1.5 else 'NOT met'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
