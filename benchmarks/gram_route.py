"""Benchmark: the Gram matrices of resize and merge by numpy's symmetric product or torch's general one.

``loralib.compose.lowrank.gram`` hands ``AᵀA`` to numpy (BLAS ``syrk``, half the multiplications)
when numpy's OpenBLAS runs one thread per call, and to torch otherwise. This runs the same
in-process resize (r128 → 32) and merge (3 × r64 → 64) of the full-size SDXL files of
``whole_process.py`` with each route, alternating round by round in one process (the page cache
warm, torch on two threads), and prints wall and CPU time of each. ``OPENBLAS_NUM_THREADS`` is set
to 1 before numpy loads; the torch route is chosen per call by changing it afterwards, which
``gram`` reads each time.

    .venv/bin/python benchmarks/gram_route.py [--rounds 3] [--cache ~/.cache/lorareg-bench]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy is imported (by torch)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lorareg-bench")
    args = parser.parse_args()
    folder = args.cache / "full"
    if not (folder / "sdxl_r128.safetensors").exists():
        sys.exit(f"no inputs in {folder}: run benchmarks/whole_process.py once to build them")

    import torch

    from loralib.compose import merge, resize

    torch.set_num_threads(2)
    tasks = {
        "resize r128 -> 32": lambda: resize(folder / "sdxl_r128.safetensors", 32),
        "merge 3 x r64 -> 64": lambda: merge([(folder / f"sdxl_r64_{i}.safetensors", w)
                                              for i, w in zip((1, 2, 3), (0.5, 0.3, -0.2))], 64),
    }
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, 2 threads; {args.rounds} rounds")
    for name, task in tasks.items():
        task()  # warm the page cache and the allocator
        times: dict[str, list[tuple[float, float]]] = {"numpy syrk": [], "torch matmul": []}
        for _ in range(args.rounds):
            for route in times:
                os.environ["OPENBLAS_NUM_THREADS"] = "1" if route == "numpy syrk" else "torch"
                cpu, wall = cpu_seconds(), time.perf_counter()
                task()
                times[route].append((time.perf_counter() - wall, cpu_seconds() - cpu))
        for route, runs in times.items():
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            shown = ", ".join(f"{w:.2f}/{c:.2f}" for w, c in runs)
            print(f"  {name:22s} {route:13s} median {wall:5.2f} s wall {cpu:5.2f} s CPU   (wall/CPU: {shown})")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
