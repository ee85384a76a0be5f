"""Composition speed on full-size SDXL-shaped adapters: lorareg's exact low-rank route against the
dense method of sd-scripts (``up @ down`` in float32, then ``torch.linalg.svd`` per module).

Adapters cover every attention, feed-forward and projection layer of the SDXL UNet and both text
encoders (986 modules), fp16, random factors with decaying spectra.

1. resize rank 128 -> 32 (goal: >= 50x faster than dense, equal error);
2. merge of three rank-64 adapters to rank 64 (goal: >= 20x faster than dense);
3. each whole operation (read + compute + write) as a ratio to reading the inputs and writing the
   output alone (goal: <= 3x).

lorareg runs on every module. The dense baseline takes many minutes on every module of SDXL, so
it runs on a deterministic sample: the first ``--dense-per-shape`` modules (sorted by key) of each
distinct layer shape. lorareg is timed on exactly the same modules, and the speedup on that
sample is the measured one; the whole-model dense time is also estimated (per-shape mean x
module count) and printed, labelled as an estimate. Errors are relative Frobenius errors against
the exact delta, for both methods, on the sampled modules.

    .venv/bin/python benchmarks/compose.py [--dense-per-shape 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

import loralib
from loralib.base_model import full_size_layers
from loralib.compose import merge, resize
from loralib.compose.merging import stacked_factors
from loralib.compose.parallel import map_modules
from loralib.compose.rank_rules import RankRule
from loralib.compose.reduce import reduce_factors
from loralib.formats import load_adapter
from loralib.layers import select_layers
from loralib.synthetic import random_adapter


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """The fastest of ``repeats`` runs of ``fn`` (seconds) and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def dense_truncate(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sd-scripts' method: a full SVD of the dense float32 delta, then the top ``rank`` triplets."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def sample(keys_by_shape: dict[tuple, list[str]], per_shape: int) -> list[str]:
    """The first ``per_shape`` keys of every shape: deterministic and covering every layer size."""
    return [k for keys in keys_by_shape.values() for k in sorted(keys)[:per_shape]]


def compare(name: str, parts_of: Callable[[str], list], keys: list[str], rank: int,
            keys_by_shape: dict[tuple, list[str]]) -> dict:
    """Time lorareg's route and the dense baseline on the same modules; errors of both.

    Each method gets both cores the way that suits it: lorareg as it runs in ``merge``/``resize``
    (modules side by side, one thread each; best of 3 runs); the dense baseline one module at a time
    with torch's intra-op threads, timed with 1 and with all threads, the faster kept.
    """
    rule = RankRule("fixed", rank)

    def ours_one(key: str):
        up, down, scale = stacked_factors(parts_of(key))
        new_up, new_down, _ = reduce_factors(up, down, rule, scale)
        return new_up, new_down

    ours_t, ours = timed(lambda: map_modules(ours_one, keys), 3)

    def exact_delta(key: str) -> torch.Tensor:
        total = 0
        for module, weight, _ in parts_of(key):
            f_up, f_down = module.factors(torch.float32)
            total = total + (weight * module.scale) * (f_up @ f_down)
        return total

    threads = torch.get_num_threads()
    dense_t, per_shape, dense = float("inf"), {}, []
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        run_t, run_shape, run = 0.0, defaultdict(list), []
        for key in keys:
            start = time.perf_counter()
            matrix = exact_delta(key)
            run.append(dense_truncate(matrix, rank))
            elapsed = time.perf_counter() - start
            run_t += elapsed
            run_shape[tuple(matrix.shape)].append(elapsed)
        if run_t < dense_t:
            dense_t, per_shape, dense = run_t, run_shape, run
    torch.set_num_threads(threads)
    ours_err, dense_err, worst_gap = [], [], 0.0
    for key, (o_up, o_down), (d_up, d_down) in zip(keys, ours, dense):
        exact = exact_delta(key)
        norm = float(exact.norm())
        e_ours = float((o_up @ o_down - exact).norm()) / norm
        e_dense = float((d_up @ d_down - exact).norm()) / norm
        ours_err.append(e_ours)
        dense_err.append(e_dense)
        worst_gap = max(worst_gap, abs(e_ours - e_dense) / e_dense)
    estimate = sum(len(keys_by_shape[s]) * sum(t) / len(t) for s, t in per_shape.items())
    return {"name": name, "modules": len(keys), "ours": ours_t, "dense": dense_t, "dense_estimate": estimate,
            "ours_err": max(ours_err), "dense_err": max(dense_err), "gap": worst_gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-per-shape", type=int, default=2, help="modules per layer shape in the dense sample")
    parser.add_argument("--repeats", type=int, default=1, help="repeats of each whole operation (best is kept)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    work = Path(tempfile.mkdtemp(prefix="lorareg-compose-bench-"))
    try:
        layers = select_layers(full_size_layers("sdxl"))
        keys_by_shape: dict[tuple, list[str]] = defaultdict(list)
        for key, shape in layers.items():
            keys_by_shape[(shape.out_features, shape.in_features)].append(key)
        dense_keys = sample(keys_by_shape, args.dense_per_shape)
        big = work / "sdxl_r128.safetensors"
        loralib.save(random_adapter(layers, 128, 64.0, seed=1, architecture="sdxl", dtype=torch.float16), big)
        smalls = []
        for seed in (2, 3, 4):
            smalls.append(work / f"sdxl_r64_{seed}.safetensors")
            loralib.save(random_adapter(layers, 64, 32.0, seed=seed, architecture="sdxl", dtype=torch.float16), smalls[-1])
        gc.collect()
        print(f"SDXL-shaped LoRAs: {len(layers)} modules ({len(keys_by_shape)} layer shapes), fp16; "
              f"rank 128: {big.stat().st_size / 2**20:.0f} MiB, rank 64: {smalls[0].stat().st_size / 2**20:.0f} MiB each")
        weights = (0.5, 0.3, -0.2)
        rows = []

        # 1. resize 128 -> 32
        load_adapter(big)  # warm the page cache: every timing below reads from memory
        read_t, adapter = timed(lambda: load_adapter(big), args.repeats)
        compute_t, result = timed(lambda: resize(adapter, rank=32), args.repeats)
        write_t, _ = timed(lambda: result.save(work / "resized.safetensors", force=True), args.repeats)
        resize_cmp = compare("resize 128 -> 32", lambda k: [(adapter.modules[k], 1.0, 0)], dense_keys, 32,
                             keys_by_shape)
        rows.append((resize_cmp, read_t, compute_t, write_t, 50))
        adapter = result = None  # free them before the next case
        gc.collect()

        # 2. merge 3 x rank 64 -> rank 64
        for path in smalls:
            load_adapter(path)
        read_t, inputs = timed(lambda: [load_adapter(p) for p in smalls], args.repeats)
        compute_t, result = timed(lambda: merge(list(zip(inputs, weights)), rank=64), args.repeats)
        write_t, _ = timed(lambda: result.save(work / "merged.safetensors", force=True), args.repeats)
        merge_cmp = compare("merge 3 x r64 -> 64",
                            lambda k: [(a.modules[k], w, i) for i, (a, w) in enumerate(zip(inputs, weights))],
                            dense_keys, 64, keys_by_shape)
        rows.append((merge_cmp, read_t, compute_t, write_t, 20))
        inputs = result = None
        gc.collect()

        print()
        print(f"Same {len(dense_keys)} modules ({args.dense_per_shape} per layer shape) for both methods:")
        print(f"{'task':<22}{'lorareg':>10}{'dense':>11}{'speedup':>9}{'goal':>7}   "
              f"{'max rel. error (lorareg / dense / worst gap)':<44}")
        for cmp, *_, goal in rows:
            speedup = cmp["dense"] / cmp["ours"]
            print(f"{cmp['name']:<22}{cmp['ours']:>9.2f}s{cmp['dense']:>10.1f}s{speedup:>8.0f}x{goal:>6}x   "
                  f"{cmp['ours_err']:.6f} / {cmp['dense_err']:.6f} / {cmp['gap']:.1e}")
        print()
        print(f"Whole operation on all {len(layers)} modules (page cache warm; best of {args.repeats}):")
        print(f"{'task':<22}{'read':>8}{'compute':>9}{'write':>8}{'total':>8}{'total/(read+write)':>20}"
              f"{'  dense estimate (not measured)':>32}")
        for cmp, read_t, compute_t, write_t, _ in rows:
            total = read_t + compute_t + write_t
            print(f"{cmp['name']:<22}{read_t:>7.2f}s{compute_t:>8.2f}s{write_t:>7.2f}s{total:>7.2f}s"
                  f"{total / (read_t + write_t):>19.2f}x{cmp['dense_estimate'] / 60:>22.1f} min "
                  f"({cmp['dense_estimate'] / compute_t:.0f}x)")
        print("\nThe dense estimate is the per-shape mean dense time on the sample times the number of modules of"
              " that shape; the measured speedups are the ones on the sample.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
