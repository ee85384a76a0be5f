"""Process modules on a small pool of threads, each running torch single-threaded.

Per-module work here is a few milliseconds of small matrix algebra, where torch's intra-op
threads mostly wait on each other (and slow down badly when other processes share the cores).
Running independent modules side by side, one core each, keeps every core busy instead. torch
releases the GIL inside its operations, so plain threads suffice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

from ..errors import CorruptFileError
from ..files.pages import return_freed_memory

Item = TypeVar("Item")
Result = TypeVar("Result")


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch operations on one intra-op thread inside the block (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def map_modules(function: Callable[[Item], Result], items: Sequence[Item],
                progress: Callable[[int, int], None] | None = None, workers: int | None = None,
                names: Sequence[str] | None = None) -> list[Result]:
    """``[function(item) for item in items]``, computed ``workers`` at a time (default: torch's thread count).

    Results come back in order; ``progress(done, total)`` is called as they do. At most
    ``workers`` items are in flight, so memory stays bounded by what that many calls hold. A
    factorisation that fails (values too large for the working precision) is a
    :class:`~loralib.errors.CorruptFileError` naming the module (``names``, else the item).
    """
    function = _named_errors(function, items, names)
    workers = workers or torch.get_num_threads()
    total = len(items)
    results: list[Result] = []

    def done(result: Result) -> None:
        results.append(result)
        if len(results) % TRIM_EVERY == 0:
            return_freed_memory()
        if progress:
            progress(len(results), total)

    if workers <= 1 or total < 2:
        for item in items:
            done(function(item))
        return results
    with single_threaded_torch(), ThreadPoolExecutor(workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > 2 * workers:  # keep a few queued, not the whole model
                done(pending.pop(0).result())
        for future in pending:
            done(future.result())
    return results


# Modules computed between two returns of freed memory to the system (each costs well under a millisecond).
TRIM_EVERY = 32


def _named_errors(function: Callable[[Item], Result], items: Sequence[Item],
                  names: Sequence[str] | None) -> Callable[[Item], Result]:
    labels = {id(item): name for item, name in zip(items, names)} if names is not None else {}

    def call(item: Item) -> Result:
        try:
            return function(item)
        except torch.linalg.LinAlgError as exc:
            what = labels.get(id(item), str(item)[:200])
            reason = str(exc).split(":", 1)[-1].strip().split(".")[0]
            raise CorruptFileError(f"module {what} cannot be factorised ({reason})",
                                   "Its values are not finite, or too large to compute with in float32/float64") from exc
    return call
