"""Index a folder of adapters in place, incrementally.

Only headers are parsed (and the bytes hashed once); a file whose size and mtime match what the
catalog recorded is skipped without being opened, so a rescan costs one ``stat`` per file.
Links to folders are followed once (loops are detected), and those leading outside the folder
only when asked. Results are committed in small batches: a scan that is interrupted (Ctrl-C, a kill, a crash)
leaves a consistent catalog holding every batch committed so far, and the next scan skips those
files and completes the rest. Files that are not adapters are counted and remembered (so a
rescan skips them too); damaged ones are flagged; no file, however broken, stops the scan.

Reading files (headers, hashes, fingerprints: CPU work in Python) is spread over worker processes
when there are many to read, one per free core; the catalog is written by this process alone, in order.
Work is handed out in small chunks with only a few in flight, so memory stays flat however many
files the folder holds. A worker passes back only what the catalog stores of each file (a
:class:`~lorareg.registry.describe.FileRow` of plain values): passing the whole header report back
cost the scanning process about as much CPU as storing the file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loralib.errors import (
    CorruptFileError,
    InputNotFoundError,
    InvalidArgumentError,
    LoraError,
    NotALoraError,
    UnsafeFileError,
)
from loralib.files import PICKLE_SUFFIXES
from loralib.vocabulary import FOLDER_WEIGHTS

from .catalog import Catalog
from .paths import absolute, storable

if TYPE_CHECKING:
    from .describe import FileRow

Progress = Callable[[int, int], None]
ADAPTER_SUFFIXES = (".safetensors",)
BATCH_FILES = 200
BATCH_SECONDS = 0.5
PARALLEL_FROM = 200  # files to read before worker processes pay for their start-up
CHUNK_FILES = 64  # files per task handed to a worker
PARENT_POLL_SECONDS = 0.2  # how often a worker checks that the scanning process is still there


@dataclass
class ScanReport:
    """What a scan found. Paths are listed for the files that need attention."""

    folder: str
    found: int = 0
    added: int = 0
    updated: int = 0
    extra_paths: int = 0
    unchanged: int = 0
    not_lora: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # links not followed, names not storable
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def indexed(self) -> int:
        """Files read and recorded in this run."""
        return self.added + self.updated + self.extra_paths

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return {**asdict(self), "indexed": self.indexed}


class ScanInterrupted(KeyboardInterrupt):
    """Raised when a scan is interrupted; ``report`` says what was committed before it stopped."""

    def __init__(self, report: ScanReport) -> None:
        super().__init__("scan interrupted")
        self.report = report


def _entries(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as found:
            return sorted(found, key=lambda e: e.name)
    except OSError:
        return []


def _walk(folder: Path, recursive: bool, follow_links: bool, skipped: list[dict[str, str]]) -> Iterator[str]:
    """Adapter and pickle files under ``folder``, skipping hidden entries and our own partial writes.

    Each folder is visited once (a link that loops back is reported, not followed); links to
    folders outside ``folder`` are followed only with ``follow_links``, and never to the root of
    the file system or to a folder that contains ``folder``.
    """
    real_root = os.path.realpath(folder)
    try:
        visited = {_identity(folder)}
    except OSError:
        return
    stack = [iter(_entries(str(folder)))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            continue
        if not is_dir:
            if entry.name.lower().endswith(ADAPTER_SUFFIXES + PICKLE_SUFFIXES) and entry.is_file():
                yield entry.path
            continue
        if not recursive:
            continue
        if entry.is_symlink():
            reason = _link_problem(entry.path, real_root, follow_links)
            if reason is not None:
                skipped.append({"path": entry.path, "reason": reason})
                continue
        try:
            identity = _identity(entry.path)
        except OSError:
            continue
        if identity in visited:
            if entry.is_symlink():
                skipped.append({"path": entry.path, "reason": "a link to a folder scanned already (a loop)"})
            continue
        visited.add(identity)
        stack.append(iter(_entries(entry.path)))


def _identity(path: str | os.PathLike) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _link_problem(path: str, real_root: str, follow_links: bool) -> str | None:
    """Why the folder link at ``path`` is not followed, or None to follow it."""
    target = os.path.realpath(path)
    inside = target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)
    if inside:
        return None
    if target == os.path.realpath(os.sep) or real_root.startswith(target.rstrip(os.sep) + os.sep):
        return f"a link to {target}, which contains the scanned folder (never followed)"
    if not follow_links:
        return f"a link to {target}, outside the scanned folder (--follow-links follows it)"
    return None


def _candidates(folder: Path, recursive: bool, report: ScanReport, follow_links: bool) -> list[str]:
    """One main file per adapter: components of a PEFT folder are read with its main file.

    Paths stay strings here (a rescan spends its time in this loop, once per file); only files
    named like a folder adapter's weights are looked at more closely.
    """
    files: dict[str, None] = {}
    for path in _walk(folder, recursive, follow_links, report.skipped):
        if not storable(path):
            report.skipped.append({"path": path, "reason": "its name is not valid UTF-8, which the catalog "
                                                           "cannot store: rename the file"})
            continue
        if path.lower().endswith(PICKLE_SUFFIXES):
            report.pickles.append(path)
            continue
        if os.path.basename(path) in FOLDER_WEIGHTS:
            from loralib.formats.layout import adapter_root, main_file

            root = adapter_root(Path(path))
            if str(root) != path:
                path = str(main_file(root))
        files.setdefault(path, None)
    return list(files)


def scan(catalog: Catalog, folder: str | os.PathLike, *, recursive: bool = True, progress: Progress | None = None,
         batch_files: int = BATCH_FILES, batch_seconds: float = BATCH_SECONDS, follow_links: bool = False,
         workers: int | None = None) -> ScanReport:
    """Index every adapter under ``folder`` into ``catalog``; see the module docstring.

    ``progress(done, total)`` is called as files are checked. On KeyboardInterrupt the files
    already read are committed and :class:`ScanInterrupted` (a KeyboardInterrupt) is raised
    with the report. Links to folders outside ``folder`` are followed only with ``follow_links``;
    what was not followed, and files whose names the catalog cannot store, are listed in
    ``report.skipped``. ``workers`` is how many processes read files (default: one per free core
    (the cores minus the load average) when at least :data:`PARALLEL_FROM` files are to be read,
    else this process alone).
    """
    start = time.perf_counter()
    root = absolute(folder)
    if not root.is_dir():
        raise InputNotFoundError(f"{folder} is not a folder", "Give the folder that holds your adapters")
    if not storable(root):
        raise InvalidArgumentError(f"the folder name {os.fsencode(root)!r} is not valid UTF-8, which the catalog "
                                   "cannot store", "Rename the folder")
    report = ScanReport(str(root))
    files = _candidates(root, recursive, report, follow_links)
    report.found = len(files)
    known = catalog.files_under(root)
    # (path, (size, mtime)) only: a stat result or a Path per file would make memory grow with the folder
    to_read = [(path, stat) for path, stat in _stats(files) if not _unchanged(path, known.pop(path, None), stat, report)]
    done = len(files) - len(to_read)
    if progress is not None:
        progress(done, len(files))
    batch = _Batch(catalog, report, batch_files, batch_seconds)
    if workers is None:
        workers = _free_cores() if len(to_read) >= PARALLEL_FROM else 1
    try:
        for (path, stat), outcome in zip(to_read, _outcomes([path for path, _ in to_read], workers)):
            batch.add(path, stat, outcome)
            done += 1
            if progress is not None:
                progress(done, len(files))
        batch.flush()
        _mark_missing(catalog, known, report, root, recursive)
    except KeyboardInterrupt as exc:
        report.interrupted = True
        try:
            batch.flush()
        finally:
            report.seconds = time.perf_counter() - start
        raise ScanInterrupted(report) from exc
    report.seconds = time.perf_counter() - start
    return report


Stat = tuple[int, int]  # size, mtime in nanoseconds


def _stats(files: list[str]) -> Iterator[tuple[str, Stat]]:
    for path in files:
        try:
            found = os.stat(path)
        except OSError:  # vanished since the walk
            continue
        yield path, (found.st_size, found.st_mtime_ns)


def _unchanged(path: str, known: tuple | None, stat: Stat, report: ScanReport) -> bool:
    """True (and counted) when the catalog saw this file with the same size and mtime (and has its fingerprint)."""
    if known is None or known[0] != stat[0] or known[1] != stat[1] or known[2] in ("missing", "stale"):
        return False
    report.unchanged += 1
    if known[2] in ("not-lora", "damaged"):
        (report.not_lora if known[2] == "not-lora" else report.damaged).append(path)
    return True


Outcome = tuple[str, "FileRow | str"]  # ("ok", what to store) or ("not-lora" / "damaged", problem)


def _free_cores() -> int:
    """The cores this process may use minus the load already on them (at least 1): on a busy machine
    worker processes cost more CPU in all than they save in time (see benchmarks/RESULTS.md)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def _outcomes(paths: list[str], workers: int) -> Iterator[Outcome]:
    """The outcome of describing each file, in order: here, or in ``workers`` processes.

    At most a few chunks per worker are in flight, so memory does not grow with the folder.
    A pool that cannot start or breaks (a worker killed) leaves the rest to this process.
    """
    if workers <= 1 or len(paths) < 2:
        yield from map(_describe_outcome, paths)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    chunks = [paths[i:i + CHUNK_FILES] for i in range(0, len(paths), CHUNK_FILES)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    done = 0
    try:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_quiet_worker)
    except (OSError, ValueError):
        yield from map(_describe_outcome, paths)
        return
    try:
        pending: deque = deque()
        upcoming = iter(chunks)
        for chunk in upcoming:
            pending.append(pool.submit(_describe_chunk, chunk))
            if len(pending) >= 4 * workers:
                break
        while pending:
            results = pending.popleft().result()
            done += len(results)
            yield from results
            chunk = next(upcoming, None)
            if chunk is not None:
                pending.append(pool.submit(_describe_chunk, chunk))
    except BrokenProcessPool:
        yield from map(_describe_outcome, paths[done:])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _quiet_worker() -> None:
    """Workers leave Ctrl-C to the scanning process, which commits what was read and stops them; a
    kill ends them, and so does the end of the scanning process, however it ends (a SIGKILL
    included): a worker left behind would wait forever and keep the command's output open."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="lorareg-scan-parent-watch", daemon=True).start()


def _describe_chunk(paths: list[str]) -> list[Outcome]:
    return [_describe_outcome(path) for path in paths]


def _describe_outcome(path: str) -> Outcome:
    """Describe one file; what is wrong with it, if anything, as a state and a message."""
    from .describe import describe

    try:
        return "ok", describe(path).row()
    except (NotALoraError, UnsafeFileError, InputNotFoundError) as exc:
        return "not-lora", str(exc)
    except (CorruptFileError, LoraError, OSError) as exc:
        return "damaged", str(exc)
    except Exception as exc:  # a file no reader foresaw: flag it and go on; one file never stops a scan
        return "damaged", f"{os.path.basename(path)} could not be read ({type(exc).__name__}: {str(exc)[:200]})"


class _Batch:
    """Files read but not yet committed; committed together every few hundred files or half second."""

    def __init__(self, catalog: Catalog, report: ScanReport, size: int, seconds: float) -> None:
        self.catalog, self.report, self.size, self.seconds = catalog, report, size, seconds
        self.facts: list[FileRow] = []
        self.problems: list[tuple[str, Stat, str, str]] = []
        self.flushed_at = time.monotonic()

    def add(self, path: str, stat: Stat, outcome: Outcome) -> None:
        """Queue one file's outcome; commit when the batch is full or old enough."""
        state, found = outcome
        if state == "ok":
            self.facts.append(found)
            if found.damaged:
                self.report.damaged.append(path)
        else:
            self.problems.append((path, stat, state, found))
            (self.report.not_lora if state == "not-lora" else self.report.damaged).append(path)
        if len(self.facts) + len(self.problems) >= self.size or time.monotonic() - self.flushed_at >= self.seconds:
            self.flush()

    def flush(self) -> None:
        """Commit the queued files in one transaction."""
        if self.facts or self.problems:
            with self.catalog.transaction():
                for path, stat, state, problem in self.problems:
                    self.catalog.record_file(path, state=state, problem=problem, size=stat[0], mtime_ns=stat[1])
                stored = self.catalog.add_many(self.facts)
            for result in stored:
                if result.created:
                    self.report.added += 1
                elif result.new_path:
                    self.report.extra_paths += 1
                else:
                    self.report.updated += 1
        self.facts, self.problems = [], []
        self.flushed_at = time.monotonic()


def _mark_missing(catalog: Catalog, known: dict[str, tuple], report: ScanReport, root: Path, recursive: bool) -> None:
    """Files the catalog knew under ``root`` that are gone: kept, marked ``missing``."""
    gone = [p for p, (_, _, state) in known.items()
            if state != "missing" and (recursive or Path(p).parent == root) and not os.path.exists(p)]
    if not gone:
        return
    catalog.mark_missing(gone)
    report.missing.extend(gone)
