"""Catalog speed: scan of 1,000 small adapter files, rescan with nothing changed, list/search/show
on a 100,000-entry catalog, and `lorareg duplicates` over 20,000 fingerprinted entries.

    .venv/bin/python benchmarks/registry.py [--files 1000] [--entries 100000] [--duplicates 20000] [--runs 5]

Goals (issue 4): first scan >= 500 files/s, rescan >= 5,000 files/s, ``lorareg list`` and
``lorareg search`` as whole commands (a new process, Python start-up included) < 0.5 s.

Scan rates are measured in-process (the ``lorareg.registry.scan.scan`` call) and, for reference, as the
whole ``lorareg scan`` command. Baselines measured in the same run: hashing the same files with
hashlib (the I/O floor of any scan that identifies files by content), and starting Python with
``python -c pass`` (the floor of any command).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.small_loras import write_small_loras  # noqa: E402

LORAREG = [sys.executable, "-m", "lorareg"]
CAPTION_WORDS = tuple(f"{a}{b}" for a in ("red", "blue", "dark", "soft", "tall", "old", "tiny", "wide", "bright", "pale")
                      for b in ("hair", "eyes", "sky", "dress", "light", "tree", "cloud", "river", "wall", "smile",
                                "hat", "coat", "road", "sea", "moon", "star", "shadow", "window", "flower", "stone"))
WORDS = ("pixel", "anime", "style", "portrait", "castle", "watercolor", "neon", "retro", "cat", "forest", "ink",
         "sketch", "chibi", "cyberpunk", "oil", "painting", "landscape", "gothic", "vaporwave", "manga")


def _time_command(args: list[str], env: dict[str, str], runs: int) -> float:
    """Median wall time of a command started as a new process."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return statistics.median(times)


def _hash_floor(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        hashlib.sha256(path.read_bytes()).hexdigest()
    return time.perf_counter() - start


def bench_scan(work: Path, files: int, runs: int, env: dict[str, str]) -> dict:
    """First scan and rescan of ``files`` small LoRA files, in-process (median of ``runs``) and as a command."""
    from lorareg.registry.catalog import Catalog
    from lorareg.registry.scan import scan

    folder = work / "loras"
    paths = write_small_loras(folder, files)
    floor = _hash_floor(paths)
    import sqlite_utils  # noqa: F401  imported once, as a long-running process would have it
    firsts, agains = [], []
    for run in range(runs):  # a fresh catalog each time; the median is reported
        with Catalog(work / f"home-inprocess-{run}") as catalog:
            firsts.append(scan(catalog, folder))
            agains.append(scan(catalog, folder))
    assert all(r.added == files for r in firsts) and all(r.unchanged == files for r in agains)
    first = sorted(firsts, key=lambda r: r.seconds)[runs // 2]
    again = sorted(agains, key=lambda r: r.seconds)[runs // 2]
    command_env = {**env, "LORAREG_HOME": str(work / "home-command")}
    first_command = _time_command([*LORAREG, "scan", str(folder)], command_env, 1)
    rescan_command = _time_command([*LORAREG, "scan", str(folder)], command_env, 3)
    return {"files": files, "bytes_per_file": paths[0].stat().st_size,
            "first_scan_s": first.seconds, "first_scan_files_per_s": files / first.seconds,
            "rescan_s": again.seconds, "rescan_files_per_s": files / again.seconds,
            "hash_only_s": floor, "first_scan_vs_hash_only": first.seconds / floor,
            "command_first_scan_s": first_command, "command_first_scan_files_per_s": files / first_command,
            "command_rescan_s": rescan_command, "command_rescan_files_per_s": files / rescan_command}


def _synthetic_rows(count: int, seed: int = 0):
    """Rows shaped like real entries: names, tags, triggers, ss_* metadata (30 caption tags, bucket info), hashes,
    a ΔW fingerprint, one file each. A style word such as "pixel" is in about a third of them: a broad search."""
    import numpy as np

    from loralib.fingerprint import DIMENSIONS, MAGIC, band_keys
    from lorareg.registry.describe import metadata_keywords

    vectors = np.random.default_rng(seed).standard_normal((count, DIMENSIONS)).astype("<f4")

    rnd = random.Random(seed)
    stamp = "2025-01-01T00:00:00Z"
    for i in range(count):
        words = rnd.sample(WORDS, 3)
        name = f"{words[0]}-{words[1]}-{i}"
        arch = rnd.choice(("sd1", "sd1", "sdxl", "sdxl", "sd2"))
        rank = rnd.choice((4, 8, 16, 32, 64, 128))
        tensor_hash = hashlib.sha256(f"t{i}".encode()).hexdigest()
        file_hash = hashlib.sha256(f"f{i}".encode()).hexdigest()
        tags = rnd.sample(WORDS, 2)
        captions = {word: rnd.randint(1, 50) for word in rnd.sample(CAPTION_WORDS, 30)}
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                    "ss_network_alpha": str(rank // 2), "ss_output_name": name, "ss_learning_rate": "0.0001",
                    "ss_num_epochs": str(rnd.randint(1, 20)), "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
                    "ss_sd_model_name": rnd.choice(("v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors")),
                    "ss_tag_frequency": json.dumps({f"10_{words[0]}": captions}),
                    "ss_bucket_info": json.dumps({"buckets": {str(b): {"resolution": [512 + 64 * b, 512], "count": b}
                                                              for b in range(12)}}),
                    "sshs_model_hash": tensor_hash, "modelspec.title": name.replace("-", " ")}
        yield ({"name": name, "identity": hashlib.sha256(f"i{i}".encode()).hexdigest(), "tensor_sha256": tensor_hash,
                "fingerprint": MAGIC + vectors[i].tobytes(), "fp_norm": float(np.linalg.norm(vectors[i])) / 4,
                "fp_modules": 264, **{f"fp_band{b}": k for b, k in enumerate(band_keys(vectors[i].tolist()))},
                "sha256": file_hash, "legacy": file_hash[:8],
                "format": rnd.choice(("kohya", "kohya", "kohya", "peft", "diffusers")), "architecture": arch,
                "plain_lora": 1, "components": json.dumps({"unet": 192, "text_encoder": 72}), "modules": 264,
                "ranks": json.dumps({str(rank): 264}), "alphas": json.dumps({str(rank // 2): 264}), "dtype": "F16",
                "size": rank * 300_000, "tensors": 792, "parameters": rank * 150_000, "title": metadata["modelspec.title"],
                "description": f"A {words[2]} LoRA" if i % 3 == 0 else None,
                "triggers": json.dumps([f"{words[0]} {words[2]}"]), "user_triggers": "[]", "tags": json.dumps(tags),
                "metadata": json.dumps(metadata), "keywords": metadata_keywords(metadata), "source": "file",
                "added_at": stamp, "updated_at": stamp},
               f"/loras/{name}.safetensors", file_hash)


def build_catalog(home: Path, entries: int) -> tuple[str, str]:
    """A catalog of ``entries`` synthetic rows inserted directly (the FTS index is kept by its triggers)."""
    from lorareg.registry.catalog import Catalog
    from lorareg.registry.schema import write

    with Catalog(home) as catalog:
        conn = catalog.conn
        with write(conn):
            for row, path, file_hash in _synthetic_rows(entries):
                cursor = conn.execute(f"INSERT INTO adapters ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                                      list(row.values()))
                conn.execute("INSERT INTO files (path, adapter_id, size, mtime_ns, sha256, state) "
                             "VALUES (?, ?, 1, 1, ?, 'ok')", (path, cursor.lastrowid, file_hash))
        conn.execute("PRAGMA optimize")
        name, tensor_hash = conn.execute("SELECT name, tensor_sha256 FROM adapters WHERE id = ?",
                                         (entries // 2,)).fetchone()
    return name, tensor_hash


def bench_queries(work: Path, entries: int, runs: int, env: dict[str, str]) -> dict:
    """Whole-command times of list/search/show on a catalog of ``entries``."""
    home = work / "home-big"
    start = time.perf_counter()
    name, tensor_hash = build_catalog(home, entries)
    built = time.perf_counter() - start
    command_env = {**env, "LORAREG_HOME": str(home)}
    commands = {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "lorareg --help": [*LORAREG, "--help"],
        "lorareg list": [*LORAREG, "list"],
        "lorareg list --json": [*LORAREG, "list", "--json"],
        "lorareg list --arch sdxl --tag pixel": [*LORAREG, "list", "--arch", "sdxl", "--tag", "pixel"],
        "lorareg search pixel": [*LORAREG, "search", "pixel"],
        "lorareg search 'neon castle' --json": [*LORAREG, "search", "neon castle", "--json"],
        "lorareg search 'tags:anime NOT retro'": [*LORAREG, "search", "tags:anime NOT retro"],
        "lorareg show NAME": [*LORAREG, "show", name],
        "lorareg show HASH12": [*LORAREG, "show", tensor_hash[:12]],
    }
    times = {label: _time_command(args, command_env, runs) for label, args in commands.items()}
    size = sum(p.stat().st_size for p in home.iterdir())
    return {"entries": entries, "build_s": built, "database_mib": size / 2**20, "median_s": times}


def bench_duplicates(work: Path, entries: int, env: dict[str, str]) -> dict:
    """`lorareg duplicates --json` as a command on a catalog of ``entries`` fingerprinted entries (all pairs compared)."""
    home = work / "home-duplicates"
    build_catalog(home, entries)
    seconds = _time_command([*LORAREG, "duplicates", "--json"], {**env, "LORAREG_HOME": str(home)}, 1)
    return {"entries": entries, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--duplicates", type=int, default=20_000, help="entries for the duplicates timing (0: skip)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("LORAREG_HOME", "LORAREG_DEBUG")}
    with tempfile.TemporaryDirectory(prefix="lorareg-bench-") as tmp:
        work = Path(tmp)
        scan_result = bench_scan(work, args.files, min(args.runs, 3), env)
        query_result = bench_queries(work, args.entries, args.runs, env)
        duplicates = bench_duplicates(work, args.duplicates, env) if args.duplicates else None
    if args.json:
        print(json.dumps({"scan": scan_result, "queries": query_result, "duplicates": duplicates}, indent=2))
        return
    s, q = scan_result, query_result
    print(f"scan of {s['files']} files ({s['bytes_per_file']} bytes each), in-process, median of {min(args.runs, 3)}:")
    print(f"  first scan  {s['first_scan_s']:.3f} s = {s['first_scan_files_per_s']:,.0f} files/s  (goal >= 500; "
          f"{s['first_scan_vs_hash_only']:.1f}x the hashlib-only floor of {s['hash_only_s']:.3f} s)")
    print(f"  rescan      {s['rescan_s']:.3f} s = {s['rescan_files_per_s']:,.0f} files/s  (goal >= 5,000)")
    print(f"  as commands: first {s['command_first_scan_s']:.2f} s ({s['command_first_scan_files_per_s']:,.0f} files/s), "
          f"rescan {s['command_rescan_s']:.2f} s ({s['command_rescan_files_per_s']:,.0f} files/s), start-up included")
    print(f"catalog of {q['entries']:,} entries ({q['database_mib']:.0f} MiB, built in {q['build_s']:.1f} s); "
          f"median of {args.runs} runs as new processes:")
    floor = q["median_s"]["python -c pass (floor)"]
    for label, seconds in q["median_s"].items():
        goal = "  (goal < 0.5 s)" if label in ("lorareg list", "lorareg search pixel") else ""
        print(f"  {label:<42} {seconds:.3f} s  ({seconds / floor:.1f}x python start-up){goal}")
    if duplicates:
        print(f"lorareg duplicates --json on {duplicates['entries']:,} fingerprinted entries (every pair compared): "
              f"{duplicates['seconds']:.2f} s as a command")


if __name__ == "__main__":
    main()
