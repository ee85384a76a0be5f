"""Benchmark: inspect a file with a header at safetensors' size limit (99.6 MB of JSON).

The header lists about 700,000 tensors, 350,000 LoRA modules of a diffusers-style file (a crafted
file; a real adapter lists a few thousand), each a valid factor, so all of it is read and described.
``lorareg inspect --no-hash`` runs in a fresh process, so its time and peak memory (max RSS) are
the command's own; the baseline is ``json.loads`` of the same header text in this process, and
the peak memory of a process that does only that, measured the same way. The goal: inspecting
costs about as much as parsing that much JSON once.

    .venv/bin/python benchmarks/header_size.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 100 * 1024 * 1024 - 400_000


def write_header_file(path: Path) -> tuple[int, int]:
    """The largest diffusers-style header of this shape under the limit: every key a valid LoRA
    factor (rank 4, fp16), so the whole file is read, indexed and described. Returns (bytes, modules)."""
    parts = ['{"__metadata__":{"format":"pt"}']
    total, offset, count = len(parts[0]), 0, 0
    stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    while True:
        a = f',"{stem}_{count}.lora_A.weight":{{"dtype":"F16","shape":[1,4],"data_offsets":[{offset},{offset + 8}]}}'
        b = f',"{stem}_{count}.lora_B.weight":{{"dtype":"F16","shape":[4,1],"data_offsets":[{offset + 8},{offset + 16}]}}'
        if total + len(a) + len(b) > LIMIT:
            break
        parts += [a, b]
        total += len(a) + len(b)
        offset += 16
        count += 1
    raw = ("".join(parts) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return len(raw), count


def child(code: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS in MiB) of ``code`` run as the only child of a fresh
    process (the peak of RUSAGE_CHILDREN is the largest child's, so each is measured alone)."""
    result = subprocess.run([sys.executable, __file__, "--measure", *code], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    wall, cpu, rss = json.loads(result.stdout.strip().splitlines()[-1])
    return wall, cpu, rss


def measure(code: list[str]) -> None:
    """Run ``code`` and print [wall, CPU, peak RSS MiB] as JSON (the ``--measure`` mode)."""
    start = time.perf_counter()
    result = subprocess.run(code, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if "Traceback" in result.stderr or "internal error" in result.stderr:
        raise SystemExit(result.stderr)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps([wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024]))


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        measure(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorareg-bench-") as work:
        path = Path(work) / "huge_header.safetensors"
        size, count = write_header_file(path)
        print(f"header: {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB) of JSON, {count:,} modules")
        parse = [sys.executable, "-c", "import json, struct, sys; raw = open(sys.argv[1], 'rb').read();"
                 "(n,) = struct.unpack('<Q', raw[:8]); json.loads(raw[8:8 + n].decode())", str(path)]
        inspect = [sys.executable, "-m", "lorareg", "--home", work, "inspect", str(path), "--no-hash"]
        rows = []
        for _ in range(args.repeats):  # interleaved, so that load from other processes hits both alike
            rows.append((child(parse), child(inspect)))
        best_parse = min(rows, key=lambda r: r[0][1])[0]
        best_inspect = min(rows, key=lambda r: r[1][1])[1]
        print("| step | wall | CPU | peak RSS |")
        print("|---|---|---|---|")
        print(f"| json.loads of the header (baseline, own process) | {best_parse[0]:.1f} s | {best_parse[1]:.1f} s | "
              f"{best_parse[2]} MiB |")
        print(f"| lorareg inspect --no-hash | {best_inspect[0]:.1f} s | {best_inspect[1]:.1f} s | {best_inspect[2]} MiB |")
        print(f"ratio (CPU): {best_inspect[1] / best_parse[1]:.2f}, ratio (memory): "
              f"{best_inspect[2] / best_parse[2]:.2f}  (fastest of {args.repeats})")


if __name__ == "__main__":
    main()
