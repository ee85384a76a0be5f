"""`lorareg scan` of a large folder as a whole command: first scan, rescan, peak memory.

The folder holds ``--files`` small kohya LoRA files (4 rank-1 SD1.5 modules each, every file
different; tests/helpers/small_loras.py), built once into ``--cache`` and reused. Each scan is a
new ``python -m lorareg scan`` process with its own catalog (``LORAREG_HOME``), so Python's start-up
is included. Memory must stay flat: the first scan's peak RSS is also measured on a tenth of the
folder, and the two are compared. Goals of issue 14: first scan ≥ 1,000 files/s, rescan ≥ 20,000
files/s, on 100,000 files.

``--workers`` compares first scans with several ``scan --workers`` settings (``auto``: the command's
default), each into a fresh catalog, in the order given, repeated ``--rounds`` times with the order
reversed every other round; the CPU figures then include the worker processes (the scanning
process reaps them before it exits).

    .venv/bin/python benchmarks/scan_folder.py [--files 100000] [--rescans 3] [--workers auto 1 2 --rounds 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from processes import ROOT, load, run_child


def build(folder: Path, files: int) -> None:
    """Write the folder's files (in a child process, so this one stays small; see whole_process.py)."""
    if folder.is_dir() and len(os.listdir(folder)) == files:
        return
    shutil.rmtree(folder, ignore_errors=True)
    code = ("import sys; from pathlib import Path; from tests.helpers.small_loras import write_small_loras; "
            "write_small_loras(Path(sys.argv[1]), int(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, str(folder), str(files)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def run_scan(folder: Path, home: Path, workers: str = "auto") -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system of the scanning process and of the worker processes
    it reaped) and peak RSS of one scan command."""
    env = {**os.environ, "LORAREG_HOME": str(home), "PYTHONPATH": str(ROOT)}
    extra = [] if workers == "auto" else ["--workers", workers]
    return run_child([sys.executable, "-m", "lorareg", "scan", str(folder), *extra], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rescans", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lorareg-bench")
    parser.add_argument("--workers", nargs="+", default=["auto"], help="scan --workers settings to compare")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of first scans (with several --workers)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; load average {load()}")
    big, small = args.cache / f"scan{args.files}", args.cache / f"scan{args.files // 10}"
    build(big, args.files)
    build(small, args.files // 10)
    work = Path(tempfile.mkdtemp(prefix="lorareg-scan-"))
    try:
        for folder in (big, small):  # warm the page cache and the directory entries
            for path in folder.iterdir():
                path.read_bytes()
        for round_ in range(args.rounds):
            for workers in args.workers if round_ % 2 == 0 else args.workers[::-1]:
                shutil.rmtree(work / "small", ignore_errors=True)
                shutil.rmtree(work / "big", ignore_errors=True)
                small_first = run_scan(small, work / "small", workers)
                first = run_scan(big, work / "big", workers)
                print(f"first scan of {args.files:,} files, --workers {workers}: {first[0]:.1f} s = "
                      f"{args.files / first[0]:,.0f} files/s (CPU {first[1]:.1f} s = "
                      f"{first[1] / args.files * 1e3:.2f} ms per file), peak RSS {first[2] / 2**20:.0f} MiB; "
                      f"{args.files // 10:,} files: {small_first[0]:.1f} s, peak RSS {small_first[2] / 2**20:.0f} MiB "
                      f"(load average {load()})", flush=True)
        for _ in range(args.rescans):
            again = run_scan(big, work / "big")
            print(f"rescan: {again[0]:.2f} s = {args.files / again[0]:,.0f} files/s, CPU {again[1]:.2f} s, "
                  f"peak RSS {again[2] / 2**20:.0f} MiB (load average {load()})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
