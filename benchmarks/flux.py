"""Flux.1 benchmarks: convert, resize and merge a full-size Flux-shaped LoRA.

The LoRA is what sd-scripts writes for Flux.1: kohya names, every module of every double and
single block (fused ``qkv`` and ``linear1`` included, one ``down`` each), bf16, random factors
with decaying spectra, at rank 32 and 128.

1. convert kohya -> diffusers (q, k, v split), diffusers -> kohya (fused again) and kohya ->
   ComfyUI, each against a plain ``safetensors`` load + save of the same input file in the same
   run (goal: <= 1.5x); each also with the input's hashes already known, as for a file the
   catalog holds (lorareg then hashes only what it writes);
2. resize rank r -> r/4 and merge of two rank-r LoRAs to rank r, lorareg's exact low-rank route
   (QR/Cholesky on the factors) against the dense route of sd-scripts' Flux scripts (``up @ down``
   in float32, then ``torch.linalg.svd``), on the same sample of modules — one per layer shape,
   the fused ``qkv``/``linear1`` among them — with the errors of both (goal: >= 50x, equal error);
3. each whole operation (read, compute, write kohya) against reading the inputs and writing the
   output alone.

Both routes run with ``--threads`` torch threads (default 1: on a machine whose cores other
processes share, torch's second thread mostly spins; lorareg's own operations run modules side
by side, one thread each).

    .venv/bin/python benchmarks/flux.py [--ranks 32 128] [--repeats 3] [--threads 1] [--convert-only]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loralib.base_model import full_size_layers
from loralib.compose import merge, resize
from loralib.compose.rank_rules import RankRule
from loralib.compose.reduce import reduce_factors
from loralib.files.hashes import hash_file
from loralib.formats import convert, load_adapter
from loralib.naming.flux import FLUX_MAP


def native_shapes() -> dict[str, tuple[int, int]]:
    """Every BFL module of the full-size Flux.1 transformer's blocks: (out, in), fused layers whole."""
    shapes: dict[str, tuple[int, int]] = {}
    for key, shape in full_size_layers("flux", ("transformer",)).items():
        found = FLUX_MAP.to_native(key.split(".", 1)[1])
        native, _, rule = found
        if native.startswith(("double_blocks.", "single_blocks.")):
            shapes[native] = (sum(rule.units) * shape.in_features if len(rule.parts) > 1 else shape.out_features,
                              shape.in_features)
    return shapes


def write_kohya(path: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> None:
    """A kohya Flux LoRA as sd-scripts writes it: bf16 factors, alpha = rank."""
    g = torch.Generator().manual_seed(seed)
    decay = 0.9 ** torch.arange(rank, dtype=torch.float32)
    tensors = {}
    for native, (out, width) in shapes.items():
        name = "lora_unet_" + native.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, width, generator=g) / width ** 0.5).to(torch.bfloat16)
        tensors[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * decay / out ** 0.5).to(torch.bfloat16)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path, {"ss_base_model_version": "flux1"})


def fresh(output: Path) -> Path:
    shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink(missing_ok=True)
    gc.collect()
    return output


def best(fn, repeats: int, before=None) -> float:
    """The shortest of ``repeats`` timed calls of ``fn``; ``before`` runs untimed before each."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hashed_copy(source: Path, output: Path) -> None:
    """load + save, plus the three SHA-256 passes every lorareg conversion makes, one after another:
    the input's whole file and its tensor data (the input's identity in the output's history) and the
    output's tensor data (its ``sshs_model_hash``), one after another, single-threaded (lorareg overlaps them)."""
    save_file(load_file(source), output)
    data = source.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    hashlib.sha256(data).hexdigest()
    hashlib.sha256(memoryview(data)[start:]).hexdigest()
    written = output.read_bytes()
    hashlib.sha256(memoryview(written)[8 + int.from_bytes(written[:8], "little"):]).hexdigest()


def bench_convert(work: Path, source: Path, repeats: int) -> list[tuple[str, float, float]]:
    """(step, seconds, ratio to the baseline of the same input), interleaved and best of ``repeats``."""
    diffusers_file = fresh(work / "as_diffusers.safetensors")
    convert(source, diffusers_file, "diffusers")
    known, known_diffusers = hash_file(source), hash_file(diffusers_file)
    # (output, step): the previous output is deleted before each timed run, outside the timing
    steps = {
        "safetensors load + save (baseline)": (work / "plain.safetensors", lambda out: save_file(load_file(source), out)),
        "  + the three SHA-256 passes, in turn": (work / "hashed.safetensors", lambda out: hashed_copy(source, out)),
        "kohya -> diffusers (split)": (work / "d.safetensors", lambda out: convert(source, out, "diffusers")),
        "diffusers -> kohya (fused)": (work / "k.safetensors", lambda out: convert(diffusers_file, out, "kohya")),
        "kohya -> ComfyUI": (work / "c.safetensors", lambda out: convert(source, out, "comfyui")),
        # the input's hashes known, as the catalog knows them for a file it holds (see registry/known.py)
        "kohya -> diffusers, hashes known": (work / "dk.safetensors",
                                             lambda out: convert(source, out, "diffusers", source_hashes=known)),
        "diffusers -> kohya, hashes known": (work / "kk.safetensors",
                                             lambda out: convert(diffusers_file, out, "kohya",
                                                                 source_hashes=known_diffusers)),
        "kohya -> ComfyUI, hashes known": (work / "ck.safetensors",
                                           lambda out: convert(source, out, "comfyui", source_hashes=known)),
    }
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, (out, fn) in steps.items():
            times[name].append(best(partial(fn, out), 1, before=partial(fresh, out)))
    baseline = min(times["safetensors load + save (baseline)"])
    return [(name, min(t), min(t) / baseline) for name, t in times.items()]


def bench_low_rank(modules: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]], rank: int, repeats: int) -> dict:
    """lorareg's route and the dense route on the same modules (each a weighted sum of factor pairs)."""
    rule = RankRule("fixed", rank)

    def ours(out):
        out.clear()
        for name, parts in modules.items():
            up = torch.cat([u.float() for u, _, _ in parts], dim=1)
            down = torch.cat([d.float() for _, d, _ in parts], dim=0)
            scale = torch.cat([torch.full((d.shape[0],), c, dtype=torch.float64) for _, d, c in parts])
            new_up, new_down, _ = reduce_factors(up, down, rule, scale)
            out[name] = (new_up, new_down)

    def exact(name):
        return sum(c * (u.float() @ d.float()) for u, d, c in modules[name])

    def dense(out):
        out.clear()
        for name in modules:
            u, s, vh = torch.linalg.svd(exact(name), full_matrices=False)
            out[name] = (u[:, :rank] * s[:rank], vh[:rank])

    ours_result, dense_result = {}, {}
    ours_t = best(lambda: ours(ours_result), repeats)
    dense_t = best(lambda: dense(dense_result), 1)  # minutes: timed once
    errors = []
    for name in modules:
        target = exact(name)
        norm = float(target.norm())
        e_ours = float((ours_result[name][0] @ ours_result[name][1] - target).norm()) / norm
        e_dense = float((dense_result[name][0] @ dense_result[name][1] - target).norm()) / norm
        errors.append((e_ours, e_dense))
    return {"ours": ours_t, "dense": dense_t, "errors": errors}


def whole_operations(work: Path, a: Path, b: Path, rank: int, target: int) -> None:
    """Resize and merge through the library, file to file, against reading and writing alone."""
    load_adapter(a)  # warm the page cache
    read_t = best(lambda: load_adapter(a), 1)
    adapter = load_adapter(a)
    compute_t = best(lambda: resize(adapter, rank=target), 1)
    composition = resize(adapter, rank=target)
    write_t = best(lambda: composition.save(work / "resized.safetensors", fused_rank=target), 1,
                   before=lambda: fresh(work / "resized.safetensors"))
    print(f"  whole resize {rank} -> {target}: read {read_t:.2f} s, compute {compute_t:.2f} s, write (kohya, "
          f"fused at rank {target}) {write_t:.2f} s; total / (read + write) = "
          f"{(read_t + compute_t + write_t) / (read_t + write_t):.2f}x")
    adapter = composition = None
    gc.collect()
    read_t = best(lambda: [load_adapter(a), load_adapter(b)], 1)
    inputs = [load_adapter(a), load_adapter(b)]
    compute_t = best(lambda: merge(list(zip(inputs, (0.6, 0.4))), rank=rank), 1)
    composition = merge(list(zip(inputs, (0.6, 0.4))), rank=rank)
    write_t = best(lambda: composition.save(work / "merged.safetensors", fused_rank=rank), 1,
                   before=lambda: fresh(work / "merged.safetensors"))
    print(f"  whole merge 2 x r{rank} -> {rank}: read {read_t:.2f} s, compute {compute_t:.2f} s, write "
          f"{write_t:.2f} s; total / (read + write) = {(read_t + compute_t + write_t) / (read_t + write_t):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every step")
    parser.add_argument("--convert-only", action="store_true", help="only the conversions (minutes instead of an hour)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    shapes = native_shapes()
    by_shape: dict[tuple[int, int], str] = {}
    for native, shape in sorted(shapes.items()):
        by_shape.setdefault(shape, native)
    sample = sorted(by_shape.values())
    work = Path(tempfile.mkdtemp(prefix="lorareg-flux-bench-"))
    try:
        for rank in args.ranks:
            a, b = work / f"flux_r{rank}_a.safetensors", work / f"flux_r{rank}_b.safetensors"
            write_kohya(a, shapes, rank, seed=1)
            write_kohya(b, shapes, rank, seed=2)
            print(f"\n== rank {rank}: {len(shapes)} kohya modules (19 double + 38 single blocks), bf16, "
                  f"{a.stat().st_size / 2**20:.0f} MiB per file")
            for name, seconds, ratio in bench_convert(work, a, args.repeats):
                print(f"  {name:<38}{seconds:>8.2f} s{ratio:>8.2f}x")
            if args.convert_only:
                continue
            tensors_a, tensors_b = load_file(a), load_file(b)

            def pair(tensors, native, coefficient=1.0):
                name = "lora_unet_" + native.replace(".", "_")
                return (tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"], coefficient)

            target = max(1, rank // 4)
            cases = {f"resize {rank} -> {target}": ({n: [pair(tensors_a, n)] for n in sample}, target),
                     f"merge 2 x r{rank} -> {rank}": ({n: [pair(tensors_a, n, 0.6), pair(tensors_b, n, 0.4)]
                                                       for n in sample}, rank)}
            for label, (modules, keep) in cases.items():
                result = bench_low_rank(modules, keep, args.repeats)
                gap = max(abs(o - d) / d for o, d in result["errors"])
                print(f"  {label}: {len(modules)} modules (one per layer shape): lorareg {result['ours']:.3f} s, "
                      f"dense {result['dense']:.1f} s, {result['dense'] / result['ours']:.0f}x; max rel. error "
                      f"{max(o for o, _ in result['errors']):.6f} / {max(d for _, d in result['errors']):.6f} "
                      f"(worst gap {gap:.1e})")
            del tensors_a, tensors_b
            gc.collect()
            whole_operations(work, a, b, rank, target)
            for path in work.glob("*.safetensors"):
                path.unlink()
        print(f"\nload average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
