"""Benchmark: convert a full-size SDXL-shaped kohya LoRA to PEFT and back.

The adapter covers every attention, feed-forward and projection layer of the SDXL UNet and
both text encoders, rank 32, fp16, random factors. Each conversion is timed against a plain
``safetensors`` load + save of the same file in the same run (best of several repeats), so the
ratio is independent of the machine.

    .venv/bin/python benchmarks/convert.py [--repeats 3] [--rank 32]
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

from loralib.base_model import full_size_layers
from loralib.formats import convert
from loralib.synthetic import random_adapter, select_layers


def best_time(fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs of ``fn`` (seconds)."""
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="lorareg-bench-"))
    try:
        layers = select_layers(full_size_layers("sdxl"), attention=True, feed_forward=True, projections=True)
        adapter = random_adapter(layers, rank=args.rank, alpha=args.rank / 2, architecture="sdxl", dtype=torch.float16)
        source = work / "sdxl_r32.safetensors"
        adapter.save(source)
        size = source.stat().st_size
        del adapter
        print(f"SDXL-shaped kohya LoRA: {len(layers)} modules, rank {args.rank}, fp16, {size / 2**20:.1f} MiB")

        def plain() -> None:
            save_file(load_file(source), work / "plain.safetensors")

        def to_peft() -> None:
            convert(source, work / "peft", "peft", force=True)

        def back() -> None:
            convert(work / "peft", work / "back.safetensors", "kohya", force=True)

        to_peft()  # warm the page cache for every file involved
        baseline = best_time(plain, args.repeats)
        peft_time = best_time(to_peft, args.repeats)
        back_time = best_time(back, args.repeats)
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
