"""How many CPU threads torch uses for a command (the ``LORAREG_THREADS`` knob).

torch starts as many threads as the machine has cores, whatever else runs on them. On a busy
machine that oversubscribes the cores, and threads that spin waiting for each other make small
operations many times slower (training a tiny model ran at 0.25 steps/s instead of 9). So the
commands that compute with torch choose:

- ``LORAREG_THREADS=N``: N threads;
- else, when ``OMP_NUM_THREADS`` is set, torch's own choice from it (the environment decided);
- else one thread for tiny work (a base model under 64 MiB, such as ``lorareg tiny-model``'s),
  and otherwise the cores this process may use minus the load already on them (at least 1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

TINY_BYTES = 64 * 2**20


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(cores: int, load: float, work_bytes: int | None = None) -> int:
    """The thread count for ``cores`` cores carrying ``load`` (1-minute load average) for work of ``work_bytes``."""
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
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return default_threads(available_cores(), load, work_bytes)


def use_threads(work_bytes: int | None = None) -> int:
    """Set torch's thread count for this command (see the module docstring); returns the count in use."""
    import torch

    threads = choose_threads(work_bytes)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
