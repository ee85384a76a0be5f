"""Terminal output shared by the commands: JSON, tables, progress bars and error lines."""

from __future__ import annotations

import json
import re
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


# Characters that would act on the terminal instead of being shown: C0/C1 controls (escape
# sequences can retitle, clear or recolour it; a newline would split one line in two) and the
# bidirectional overrides that display text in another order than it is stored.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def plain(text: object) -> str:
    """Text from a file, its metadata or its path, made safe to print: control characters and
    bidirectional overrides shown as escapes (``\\x1b``), bytes that are not UTF-8 (in file
    names) as ``\\xff``. Everything lorareg prints that it did not write itself goes through this."""
    text = str(text)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def shown(text: object) -> str:
    """:func:`plain` text for rich output: its markup (``[bold]``, ``[/]``) is shown, not applied."""
    from rich.markup import escape

    return escape(plain(text))


def print_error(message: str) -> None:
    """One error line on stderr."""
    text = f"error: {plain(message)}"
    if sys.stderr.isatty():
        console(stderr=True).print(f"[bold red]error:[/] {shown(message)}", markup=True, highlight=False)
    else:
        print(text, file=sys.stderr)


def print_json(data: Any) -> None:
    """Machine-readable output for ``--json``: plain JSON on stdout, nothing else.

    Text that cannot be written as UTF-8 (file names that are not) is written as JSON escapes.
    """
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
    try:
        text.encode(sys.stdout.encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        text = json.dumps(data, indent=2, ensure_ascii=True, default=str)
    print(text)


def note(message: str) -> None:
    """A secondary line on stderr (kept out of stdout so it never pollutes --json output)."""
    if sys.stderr.isatty():
        console(stderr=True).print(f"[dim]{shown(message)}[/]")
    else:
        print(plain(message), file=sys.stderr)


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
        task = bar.add_task(shown(description), total=total)

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
