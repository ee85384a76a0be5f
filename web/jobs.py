"""Long actions (merge, resize, convert, generate, push) run as background jobs.

Jobs live in the server's memory, keyed by id, so a page reload finds them again; they run one
at a time on a worker thread (two heavy jobs at once would only share the same cores). A job
reports progress through the ``progress(done, total)`` callback loralib's functions take, and
cancelling takes effect at its next progress report: the callback raises :class:`JobCancelled`,
and since outputs are written to a temporary name and renamed, nothing half-written is left.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from loralib.errors import LoraError

FINISHED = ("done", "failed", "cancelled")


class JobCancelled(Exception):
    """Raised inside a job's work when the user cancelled it."""


@dataclass
class Job:
    """One background action and what is known about it."""

    id: int
    kind: str
    title: str
    state: str = "queued"  # queued, running, cancelling, done, failed, cancelled
    done: int = 0
    total: int = 0
    step: str = ""
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)

    def progress(self, done: int, total: int) -> None:
        """loralib's progress callback: record, and stop here when cancelled."""
        if self.cancel_requested.is_set():
            raise JobCancelled
        self.done, self.total = int(done), int(total)

    def checkpoint(self, step: str) -> None:
        """Name the step now running; stop here when cancelled."""
        if self.cancel_requested.is_set():
            raise JobCancelled
        self.step = step

    @property
    def fraction(self) -> float | None:
        return self.done / self.total if self.total else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary for the pages' polling."""
        return {"id": self.id, "kind": self.kind, "title": self.title, "state": self.state, "done": self.done,
                "total": self.total, "step": self.step, "error": self.error, "result": self.result,
                "finished": self.state in FINISHED}


class Jobs:
    """The server's jobs: submit, look up, cancel."""

    def __init__(self, workers: int = 1, keep: int = 200) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="lorareg-job")
        self._jobs: dict[int, Job] = {}
        self._futures: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._keep = keep

    def submit(self, kind: str, title: str, work: Callable[[Job], dict[str, Any]]) -> Job:
        """Queue ``work(job)``; what it returns becomes ``job.result``."""
        with self._lock:
            job = Job(next(self._ids), kind, title)
            self._jobs[job.id] = job
            self._forget_old()
            self._futures[job.id] = self._pool.submit(self._run, job, work)
        return job

    def _run(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        if job.cancel_requested.is_set():
            job.state, job.finished = "cancelled", time.time()
            return
        job.state = "running"
        try:
            job.result = work(job) or {}
            job.state = "done"
        except JobCancelled:
            job.state = "cancelled"
        except LoraError as exc:
            job.state, job.error = "failed", str(exc)
        except Exception as exc:  # a bug: one line for the page, the traceback for the terminal
            job.state = "failed"
            job.error = f"internal error: {type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            job.finished = time.time()

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        """Every remembered job, newest first."""
        return sorted(self._jobs.values(), key=lambda j: j.id, reverse=True)

    def cancel(self, job_id: int) -> Job | None:
        """Ask a job to stop: a queued job never starts, a running one stops at its next progress report."""
        job = self._jobs.get(job_id)
        if job is None or job.state in FINISHED:
            return job
        job.cancel_requested.set()
        future = self._futures.get(job_id)
        if job.state == "queued" and future is not None and future.cancel():
            job.state, job.finished = "cancelled", time.time()
        elif job.state == "running":
            job.state = "cancelling"
        return job

    def wait(self, job_id: int, timeout: float | None = None) -> Job | None:
        """Block until a job has finished (tests and scripts)."""
        future = self._futures.get(job_id)
        if future is not None and not future.cancelled():
            future.result(timeout)
        return self._jobs.get(job_id)

    def shutdown(self) -> None:
        """Cancel everything and let the worker end."""
        for job in list(self._jobs.values()):
            self.cancel(job.id)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _forget_old(self) -> None:
        finished = [j for j in sorted(self._jobs.values(), key=lambda j: j.id) if j.state in FINISHED]
        for job in finished[:max(0, len(self._jobs) - self._keep)]:
            self._jobs.pop(job.id, None)
            self._futures.pop(job.id, None)
