"""LoKr and LoHa → plain LoRA on full SDXL-sized files: lorareg's structured route against the dense
route (``ΔW`` formed in float32, then ``torch.linalg.svd`` and the top singular triplets).

Adapters cover every attention, feed-forward and projection layer of the SDXL UNet, fp16, random
factors, laid out as LyCORIS lays them out:

- LoKr ``dim 16, alpha 8, factor 8`` (``lokr_w1`` full 8 × 8 or smaller, ``lokr_w2_a/b`` of rank 16):
  lorareg takes the two small factors' SVDs (the singular values of a Kronecker product are the
  products of its factors'), never a matrix of the layer's size;
- LoHa ``dim 8, alpha 4`` and ``dim 16, alpha 8``: lorareg takes the exact face-splitting factors
  (rank 64 and 256) through the QR/Cholesky route, whose cost is ``(m + n)·R² + R³`` per module for
  ``R = dim²`` (against ``m·n·min(m, n)`` for the dense SVD).

Both are converted to rank 32 (``to_lora(adapter, 32)``, what ``lorareg convert x --rank 32`` runs).
Goal: ≥ 50× faster than the dense route on the whole operation, with equal error.

The dense route takes many minutes on every module, so it runs on a deterministic sample: the first
``--dense-per-shape`` modules (sorted by key) of each layer shape; lorareg is timed on the same
modules, and that speedup is measured. The whole-model dense time is estimated (per-shape mean ×
module count) and labelled as an estimate. Errors are relative Frobenius errors against the exact
``ΔW`` (float64), for both routes, on the sampled modules.

    .venv/bin/python benchmarks/lycoris.py [--dense-per-shape 2] [--repeats 3]
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
from loralib.compose import to_lora
from loralib.compose.parallel import map_modules
from loralib.compose.rank_rules import RankRule
from loralib.compose.spectra import lora_factors
from loralib.formats import load_adapter
from loralib.layers import select_layers
from loralib.lycoris.synthetic import random_lycoris_adapter

RANK = 32
# title -> (kind, dim, alpha, options)
KINDS = {"LoKr dim 16, factor 8": ("lokr", 16, 8.0, {"factor": 8}), "LoHa dim 8": ("loha", 8, 4.0, {}),
         "LoHa dim 16": ("loha", 16, 8.0, {})}


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """The fastest of ``repeats`` runs of ``fn`` (seconds) and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def dense_route(module, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense route: ``ΔW`` in float32, a full thin SVD, the top ``rank`` triplets."""
    matrix = module.delta(torch.float32).reshape(module.out_features, -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def compare(adapter, keys: list[str], keys_by_shape: dict[tuple, list[str]], repeats: int) -> dict:
    """Both routes on the same modules: times (each route with the thread setting that suits it) and errors."""
    rule = RankRule("fixed", RANK)
    ours_t, ours = timed(lambda: map_modules(lambda k: lora_factors(adapter.modules[k], rule)[:2], keys), repeats)
    threads = torch.get_num_threads()
    dense_t, per_shape, dense = float("inf"), {}, []
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        run_t, run_shape, run = 0.0, defaultdict(list), []
        for key in keys:
            start = time.perf_counter()
            run.append(dense_route(adapter.modules[key], RANK))
            elapsed = time.perf_counter() - start
            run_t += elapsed
            run_shape[adapter.modules[key].flat_shape].append(elapsed)
        if run_t < dense_t:
            dense_t, per_shape, dense = run_t, run_shape, run
    torch.set_num_threads(threads)
    ours_err, dense_err, gap = [], [], 0.0
    for key, (o_up, o_down), (d_up, d_down) in zip(keys, ours, dense):
        exact = adapter.modules[key].delta(torch.float64).reshape(o_up.shape[0], -1)
        norm = float(exact.norm())
        e_ours = float((o_up.double() @ o_down.double() - exact).norm()) / norm
        e_dense = float((d_up.double() @ d_down.double() - exact).norm()) / norm
        ours_err.append(e_ours)
        dense_err.append(e_dense)
        gap = max(gap, abs(e_ours - e_dense) / max(e_dense, 1e-12))
    estimate = sum(len(keys_by_shape[s]) * sum(t) / len(t) for s, t in per_shape.items())
    return {"ours": ours_t, "dense": dense_t, "estimate": estimate, "ours_err": max(ours_err),
            "dense_err": max(dense_err), "gap": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-per-shape", type=int, default=2, help="modules per layer shape in the dense sample")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each timing (best is kept)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    work = Path(tempfile.mkdtemp(prefix="lorareg-lycoris-bench-"))
    try:
        layers = select_layers(full_size_layers("sdxl", components=("unet",)))
        rows = []
        for title, (kind, dim, alpha, options) in KINDS.items():
            path = work / f"sdxl_{kind}_{dim}.safetensors"
            made = random_lycoris_adapter(layers, kind, dim, alpha, seed=1, architecture="sdxl", dtype=torch.float16,
                                          **options)
            loralib.save(made, path)
            made = None
            keys_by_shape: dict[tuple, list[str]] = defaultdict(list)
            load_adapter(path)  # warm the page cache: every timing below reads from memory
            read_t, adapter = timed(lambda path=path: load_adapter(path), args.repeats)
            for key, module in adapter.modules.items():
                keys_by_shape[module.flat_shape].append(key)
            sample = [k for keys in keys_by_shape.values() for k in sorted(keys)[:args.dense_per_shape]]
            compute_t, result = timed(lambda adapter=adapter: to_lora(adapter, RANK), args.repeats)
            write_t, _ = timed(lambda result=result: result.save(work / "plain.safetensors", force=True), args.repeats)
            cmp = compare(adapter, sample, keys_by_shape, args.repeats)
            exact_ranks = sorted({m.exact_rank for m in adapter.modules.values()})
            rows.append((title, len(adapter.modules), len(keys_by_shape), path.stat().st_size, exact_ranks, len(sample),
                         read_t, compute_t, write_t, cmp))
            adapter = result = None
            gc.collect()
        print()
        for title, modules, shapes, size, exact_ranks, sampled, read_t, compute_t, write_t, cmp in rows:
            total = read_t + compute_t + write_t
            dense_whole = read_t + cmp["estimate"] + write_t
            print(f"{title}: {modules} modules ({shapes} layer shapes), {size / 2**20:.1f} MiB, exact ranks "
                  f"{exact_ranks[0]}–{exact_ranks[-1]} → rank {RANK}")
            print(f"  same {sampled} modules ({args.dense_per_shape} per shape): lorareg {cmp['ours']:.3f} s, dense "
                  f"{cmp['dense']:.1f} s, speedup {cmp['dense'] / cmp['ours']:.0f}x; max rel. error lorareg "
                  f"{cmp['ours_err']:.6f} / dense {cmp['dense_err']:.6f} (worst gap {cmp['gap']:.1e} relative)")
            print(f"  whole operation, all modules: read {read_t:.2f} s + convert {compute_t:.2f} s + write "
                  f"{write_t:.2f} s = {total:.2f} s; dense route (estimate, not measured): "
                  f"{dense_whole / 60:.1f} min = {dense_whole / total:.0f}x")
        print("\nThe dense estimate is the per-shape mean dense time on the sample times the number of modules of"
              " that shape, plus the same read and write; the measured speedups are the ones on the sample.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
