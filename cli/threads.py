"""How many CPU threads torch uses for a command (the ``LORAREG_THREADS`` knob).

torch starts as many threads as the machine has cores, whatever else runs on them. On a busy
machine that oversubscribes the cores, and threads that spin waiting for each other make small
operations many times slower (training a tiny model ran at 0.25 steps/s instead of 9). So the
commands that compute with torch choose:

- ``LORAREG_THREADS=N``: N threads;
- else, when ``OMP_NUM_THREADS`` is set, torch's own choice from it (the environment decided);
- else one thread for tiny work (a base model under 64 MiB, such as ``lorareg tiny-model``'s),
  and otherwise the cores this process may use minus those that other processes kept busy (at
  least 1).

How busy the other processes are is measured over this command's own start-up (from
:func:`mark_start`, called first thing, to the choice, which comes after torch's import: a second
or more), from the kernel's CPU counters less this process's own CPU time. The load average is
the fallback, where those counters are not readable or the window is too short: it trails by a
minute, so right after a heavy command it still counts that command's work, and a second
command started then would wrongly take one thread.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TINY_BYTES = 64 * 2**20
SHORTEST_WINDOW = 0.25  # seconds; below it the CPU counters (100 ticks a second) say too little


@dataclass(frozen=True)
class CpuCounters:
    """The machine's CPU time (busy and in all, over every core, in seconds), this process's CPU
    time, and the wall clock, read at one moment."""

    busy: float
    total: float
    cores: int
    own: float
    wall: float


def read_counters(stat_text: str | None = None) -> CpuCounters | None:
    """The counters now, from ``/proc/stat`` (or ``stat_text``, its contents); None where unreadable."""
    try:
        if stat_text is None:
            with open("/proc/stat", encoding="ascii") as stat:
                stat_text = stat.read()
        lines = stat_text.splitlines()
        # user nice system idle iowait irq softirq steal (guest time is already in user and nice)
        ticks = [int(value) for value in lines[0].split()[1:9]]
        cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        hertz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    if len(ticks) < 5 or cores < 1 or hertz <= 0:
        return None
    idle = ticks[3] + ticks[4]
    own = os.times()
    return CpuCounters((sum(ticks) - idle) / hertz, sum(ticks) / hertz, cores, own.user + own.system,
                       time.monotonic())


def busy_elsewhere(before: CpuCounters, after: CpuCounters) -> float | None:
    """How many cores other processes kept busy between two readings (None: the window is too short)."""
    if after.wall - before.wall < SHORTEST_WINDOW or after.total <= before.total or before.cores != after.cores:
        return None
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, others / (after.total - before.total) * after.cores)


_START: CpuCounters | None = None


def mark_start() -> None:
    """Read the CPU counters at the start of a command (the CLI's first step)."""
    global _START
    _START = read_counters()


def current_load(cores: int) -> float:
    """The cores other processes keep busy: measured since :func:`mark_start` where possible (see
    the module docstring), else the 1-minute load average (0 where neither is known)."""
    now = read_counters() if _START is not None else None
    if now is not None and now.cores == cores:
        busy = busy_elsewhere(_START, now)
        if busy is not None:
            return busy
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(cores: int, load: float, work_bytes: int | None = None) -> int:
    """The thread count for ``cores`` cores of which others keep ``load`` busy, for work of ``work_bytes``."""
    if work_bytes is not None and work_bytes < TINY_BYTES:
        return 1
    return max(1, min(cores, math.floor(cores - load + 0.5)))


def folder_bytes(paths: Iterable[str | os.PathLike]) -> int | None:
    """The size on disk of local model files or folders (None when one is not local, e.g. a Hub id)."""
    total = 0
    for item in paths:
        path = Path(item).expanduser()
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        else:
            return None
    return total


def choose_threads(work_bytes: int | None = None) -> int | None:
    """The thread count for this command by the rules above (None: left to torch and ``OMP_NUM_THREADS``)."""
    from loralib.errors import InvalidArgumentError

    chosen = os.environ.get("LORAREG_THREADS", "").strip()
    if chosen and chosen.lower() != "auto":
        if not chosen.isdigit() or int(chosen) < 1:
            raise InvalidArgumentError(f"LORAREG_THREADS={chosen!r} is not a positive whole number",
                                       "Set it to a number of threads, or to auto")
        return int(chosen)
    if os.environ.get("OMP_NUM_THREADS", "").strip() and not chosen:
        return None
    cores = available_cores()
    return default_threads(cores, current_load(cores), work_bytes)


def use_threads(work_bytes: int | None = None) -> int:
    """Set torch's thread count for this command (see the module docstring); returns the count in use."""
    import torch

    threads = choose_threads(work_bytes)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
