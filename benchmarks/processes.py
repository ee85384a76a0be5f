"""What the whole-process benchmarks share: running a child process and measuring it, warming the
page cache, and the load average line. Imports neither torch nor lorareg: Linux carries a parent's
peak RSS over into a child's ``ru_maxrss`` across fork and exec, so the measuring process stays small."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_child(arguments: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system, its reaped children included) and peak RSS (bytes)
    of one child process run in the repository root; exits with its error if it fails."""
    start = time.perf_counter()
    child = subprocess.Popen(arguments, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    error = child.stderr.read().decode(errors="replace")
    child.stderr.close()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed ({child.returncode}): {error.strip()[-2000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def warm(files: Iterable[Path]) -> None:
    """Read every file once so that each timed run reads from the page cache."""
    for path in files:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def load() -> str:
    """The load averages (1, 5 and 15 minutes), for the lines that record them beside a figure."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())
