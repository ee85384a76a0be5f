"""Whole-process speed and peak memory of convert, resize and merge against the file-I/O floor.

Each operation runs as a user runs it: a new ``python -m lorareg …`` process (start-up, catalog
registration and all), on full-size SDXL-shaped kohya files (every attention, feed-forward and
projection layer of the UNet and both text encoders: 986 modules, fp16, random factors with
decaying spectra). Its baseline, run alternately with it in the same run, is the I/O floor: a new
process that does a plain ``safetensors.torch.load_file`` + ``save_file`` of each of the same input
files, one after the other. Timings are wall-clock, page cache warm (every input is read once
first); CPU time is each child's user + system time and peak RSS its ``ru_maxrss`` (``os.wait4``).
On a machine shared with other work the CPU-time ratio is the steadier one: wall time stretches
with everyone else's load. This script itself stays small (it
imports neither torch nor lorareg; the inputs are built by a child process), because Linux carries
the parent's peak RSS over into a child's ``ru_maxrss`` across fork and exec.

Tasks and the goals of issue 14 (ratio to the floor):

- convert kohya → PEFT, and PEFT → kohya (rank 128, 870 MiB): time ≤ 1.5×
- resize rank 128 → 32: time ≤ 2×, peak RSS ≤ 1.3×
- merge 3 × rank 64 → rank 64 (weights 0.5, 0.3, -0.2): time ≤ 3×, peak RSS ≤ 1.3×

The flop floor of resize and merge is printed too: the exact route needs the two Gram matrices
of every module (``2 (m + n) R²`` flops, ``R`` the input rank, or the sum of the inputs' ranks for
a merge) and the new factors (``2 (m + n) R k``), counted from the files' shapes, divided by the
float32 matrix-product rate of this machine measured in the same run (a 2048² product on every
core). The time lorareg spends on top of its I/O floor is compared with that.

The input files are built once into ``--cache`` (default ``~/.cache/lorareg-bench``) and reused.
``--small`` uses every 8th module (124 modules), for a quick check of the script itself.

    .venv/bin/python benchmarks/whole_process.py [--repeats 3] [--small] [--only resize,merge] [--inputs-in-catalog]

``--inputs-in-catalog`` adds the inputs to the catalog first, as a user who scanned their folder
has them: lorareg then takes their hashes from it instead of hashing them again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from processes import ROOT, load, run_child, warm

LORAREG = [sys.executable, "-m", "lorareg"]
MERGE_WEIGHTS = (0.5, 0.3, -0.2)
FLOOR = """\
import sys
from safetensors.torch import load_file, save_file
for source, target in zip(sys.argv[1::2], sys.argv[2::2]):
    save_file(load_file(source), target)
"""


@dataclass
class Task:
    """One operation: the lorareg command, the files its floor reads, and the goals."""

    name: str
    arguments: list[str]  # after ``python -m lorareg``; OUT stands for the output path
    output_name: str
    floor_inputs: list[Path]
    time_goal: float
    memory_goal: float | None = None
    runs: dict[str, list[tuple[float, float, int]]] = field(default_factory=lambda: {"lorareg": [], "floor": []})


def build_inputs(cache: Path, small: bool) -> dict[str, Path]:
    """The benchmark's input files in ``cache`` (built on first use): kohya r128, PEFT r128, 3 × kohya r64."""
    folder = cache / ("small" if small else "full")
    paths = {"r128": folder / "sdxl_r128.safetensors", "peft": folder / "sdxl_r128_peft",
             **{f"r64_{i}": folder / f"sdxl_r64_{i}.safetensors" for i in (1, 2, 3)}}
    if not all(p.exists() for p in paths.values()):
        print(f"building the inputs in {folder} ...", flush=True)
        command = [sys.executable, __file__, "--build", str(folder)] + (["--small"] if small else [])
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return paths


def write_inputs(folder: Path, small: bool) -> None:
    """Write the input files (in a child process: see the module docstring)."""
    import torch

    import loralib
    from loralib.base_model import full_size_layers
    from loralib.layers import select_layers
    from loralib.synthetic import random_adapter

    folder.mkdir(parents=True, exist_ok=True)
    layers = select_layers(full_size_layers("sdxl"))
    if small:
        layers = {key: shape for i, (key, shape) in enumerate(sorted(layers.items())) if i % 8 == 0}
    big = random_adapter(layers, 128, 64.0, seed=1, architecture="sdxl", dtype=torch.float16)
    loralib.save(big, folder / "sdxl_r128.safetensors", force=True)
    loralib.save(big, folder / "sdxl_r128_peft", "peft", force=True)
    del big
    for i in (1, 2, 3):
        adapter = random_adapter(layers, 64, 32.0, seed=1 + i, architecture="sdxl", dtype=torch.float16)
        loralib.save(adapter, folder / f"sdxl_r64_{i}.safetensors", force=True)


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of an adapter file or PEFT folder."""
    return sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]


def tasks_for(paths: dict[str, Path]) -> list[Task]:
    """The benchmarked operations on ``paths``."""
    merges = [paths[f"r64_{i}"] for i in (1, 2, 3)]
    return [
        Task("convert kohya -> PEFT", ["convert", str(paths["r128"]), "--to", "peft", "-o", "OUT"], "peft_out",
             safetensors_files(paths["r128"]), 1.5),
        Task("convert PEFT -> kohya", ["convert", str(paths["peft"]), "--to", "kohya", "-o", "OUT"], "kohya.safetensors",
             safetensors_files(paths["peft"]), 1.5),
        Task("resize r128 -> 32", ["resize", str(paths["r128"]), "--rank", "32", "-o", "OUT"], "resized.safetensors",
             [paths["r128"]], 2.0, 1.3),
        Task("merge 3 x r64 -> 64", ["merge", *(f"{p}:{w}" for p, w in zip(merges, MERGE_WEIGHTS)), "--rank", "64",
                                     "-o", "OUT"], "merged.safetensors", merges, 3.0, 1.3),
    ]


MATMUL_RATE = """\
import time, torch
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
best = float("inf")
for _ in range(7):
    start = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - start)
print(2 * 2048 ** 3 / best / 1e9)
"""


def matmul_gflops(env: dict[str, str]) -> float:
    """This machine's float32 matrix-product rate (GFLOP/s, best of 7, every core), in a child process."""
    done = subprocess.run([sys.executable, "-c", MATMUL_RATE], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def factor_widths(path: Path) -> tuple[int, int]:
    """``(Σ (m + n), rank)`` over the modules of a kohya file: from its header alone."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    total, rank = 0, 0
    for name, entry in header.items():
        if name.endswith(".lora_down.weight"):
            rank = entry["shape"][0]
            total += entry["shape"][1] * (entry["shape"][2] * entry["shape"][3] if len(entry["shape"]) == 4 else 1)
        elif name.endswith(".lora_up.weight"):
            total += entry["shape"][0]
    return total, rank


def flops(task: Task) -> float | None:
    """The flops of the exact low-rank route for a resize or merge (Gram matrices and new factors)."""
    if not task.name.startswith(("resize", "merge")):
        return None
    widths, rank = factor_widths(task.floor_inputs[0])
    inner = rank * len(task.floor_inputs)  # a merge concatenates the inputs' factors
    kept = int(task.arguments[task.arguments.index("--rank") + 1])
    return 2 * widths * inner * inner + 2 * widths * inner * kept


def clear(path: Path) -> None:
    """Delete an output file or folder (untimed, so every run writes a fresh output)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def measure(task: Task, work: Path, env: dict[str, str], repeats: int) -> None:
    """Alternate lorareg's command and its floor ``repeats`` times, recording both."""
    output = work / task.output_name
    lorareg = [*LORAREG, *(str(output) if a == "OUT" else a for a in task.arguments)]
    floor_outputs = [work / f"floor_{i}.safetensors" for i in range(len(task.floor_inputs))]
    floor = [sys.executable, "-c", FLOOR, *(str(p) for pair in zip(task.floor_inputs, floor_outputs) for p in pair)]
    for _ in range(repeats):
        for label, command, outputs in (("floor", floor, floor_outputs), ("lorareg", lorareg, [output])):
            for path in outputs:
                clear(path)
            task.runs[label].append(run_child(command, env))


def report(tasks: list[Task], repeats: int, gflops: float) -> None:
    """Print the medians and the ratios to the floor."""
    print(f"\nmedian of {repeats} alternating runs each (floor = plain safetensors load_file + save_file of the "
          "same inputs, a new process)")
    print(f"{'task':<24}{'wall: lorareg':>14}{'floor':>8}{'ratio':>7}{'goal':>6}   {'CPU: lorareg':>12}{'floor':>8}"
          f"{'ratio':>7}   {'peak RSS: lorareg':>17}{'floor':>10}{'ratio':>7}{'goal':>6}")
    for task in tasks:
        ours, base = ([statistics.median(run[i] for run in task.runs[label]) for i in range(3)]
                      for label in ("lorareg", "floor"))
        memory_goal = f"{task.memory_goal:.1f}x" if task.memory_goal else "-"
        print(f"{task.name:<24}{ours[0]:>13.2f}s{base[0]:>7.2f}s{ours[0] / base[0]:>6.2f}x{task.time_goal:>5.1f}x   "
              f"{ours[1]:>11.2f}s{base[1]:>7.2f}s{ours[1] / base[1]:>6.2f}x   "
              f"{ours[2] / 2**20:>13.0f} MiB{base[2] / 2**20:>6.0f} MiB{ours[2] / base[2]:>6.2f}x{memory_goal:>6}")
    print(f"\nflop floor (float32 matrix products at {gflops:.0f} GFLOP/s, measured on every core in this run):")
    for task in tasks:
        count = flops(task)
        if count is None:
            continue
        ours = statistics.median(run[0] for run in task.runs["lorareg"])
        base = statistics.median(run[0] for run in task.runs["floor"])
        floor = count / gflops / 1e9
        print(f"  {task.name:<24}{count / 1e9:>7.0f} GFLOP = {floor:.2f} s; lorareg spends {ours - base:.2f} s beyond "
              f"its I/O floor = {(ours - base) / floor:.1f}x the flop floor")
    print("\nevery run (wall s / CPU s / peak RSS MiB):")
    for task in tasks:
        for label in ("lorareg", "floor"):
            runs = ", ".join(f"{t:.2f}/{c:.2f}/{m / 2**20:.0f}" for t, c, m in task.runs[label])
            print(f"  {task.name:<24}{label:<8} {runs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each command and its floor")
    parser.add_argument("--small", action="store_true", help="every 8th module only (a quick check)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lorareg-bench",
                        help="where the input files are built once and kept")
    parser.add_argument("--only", help="comma-separated words: run only the tasks whose names contain one")
    parser.add_argument("--inputs-in-catalog", action="store_true",
                        help="add the input files to the catalog first (as after lorareg scan): their hashes are "
                             "then known and not computed again")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # internal: write the inputs into this folder
    args = parser.parse_args()
    if args.build:
        write_inputs(args.build, args.small)
        return
    from importlib.metadata import version

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {version('torch')}, "
          f"python {platform.python_version()}; load average {load()}")
    paths = build_inputs(args.cache, args.small)
    sizes = {name: sum(f.stat().st_size for f in safetensors_files(p)) / 2**20 for name, p in paths.items()}
    print("inputs: " + ", ".join(f"{name} {size:.0f} MiB" for name, size in sizes.items()))
    tasks = tasks_for(paths)
    if args.only:
        words = [w.strip().lower() for w in args.only.split(",")]
        tasks = [t for t in tasks if any(w in t.name.lower() for w in words)]
    work = Path(tempfile.mkdtemp(prefix="lorareg-whole-"))
    env = {**os.environ, "LORAREG_HOME": str(work / "home"), "PYTHONPATH": str(ROOT)}
    try:
        warm(f for path in paths.values() for f in safetensors_files(path))
        if args.inputs_in_catalog:
            subprocess.run([*LORAREG, "add", *map(str, paths.values())], env=env, check=True, capture_output=True)
            print("inputs added to the catalog first", flush=True)
        for task in tasks:
            measure(task, work, env, args.repeats)
            print(f"  done: {task.name} (load average {load()})", flush=True)
        rate = matmul_gflops(env)
        report(tasks, args.repeats, rate)
        print(f"\nload average at the end: {load()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
