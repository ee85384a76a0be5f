"""Terminal output shared by the commands: JSON, tables, progress bars and error lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def console(stderr: bool = False):
    """A rich console (imported lazily; rich costs tens of milliseconds)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output is for logs and scripts: do not wrap hashes and paths at 80 columns.
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def print_error(message: str) -> None:
    """One error line on stderr."""
    text = f"error: {message}"
    if sys.stderr.isatty():
        console(stderr=True).print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    else:
        print(text, file=sys.stderr)


def print_json(data: Any) -> None:
    """Machine-readable output for ``--json``: plain JSON on stdout, nothing else."""
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def note(message: str) -> None:
    """A secondary line on stderr (kept out of stdout so it never pollutes --json output)."""
    console(stderr=True).print(f"[dim]{message}[/]")


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@contextmanager
def progress(description: str, total: int | None = None, *, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr; yields ``update(done, total)`` for loralib's callbacks.

    Only on a terminal: elsewhere (logs, pipes) a bar is noise, and rich would leave a blank line.
    """
    if not enabled or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console(stderr=True), transient=True)
    with bar:
        task = bar.add_task(description, total=total)

        def update(done: int, new_total: int) -> None:
            bar.update(task, completed=done, total=new_total)

        yield update


@contextmanager
def steps(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar on stderr whose description changes with each step (a terminal only); yields
    ``step(description, done, total)`` for the registry's Hub callbacks."""
    if not enabled or not sys.stderr.isatty():
        yield lambda description, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console(stderr=True), transient=True)
    with bar:
        task = bar.add_task("", total=None)

        def step(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        yield step
