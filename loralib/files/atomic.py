"""Write outputs so that a failure never leaves a half-written file behind, and never lose an input.

Files are written under a temporary name in the destination folder and renamed into place
only when complete; an existing output is replaced only when the caller passes ``force``, and
an output that is one of the operation's inputs (the same file under any spelling: a symlink, a
hard link, ``./a`` for ``a``) is refused even then.

Temporary names say whose they are: ``.NAME.lorareg-HOST-PID-RANDOM.partial`` (``HOST`` is a
short digest of the machine's name). A process killed while writing leaves one behind; the next
write into the same folder removes those of this machine whose process is gone, and nothing
else. :func:`leftovers` lists them for ``lorareg verify``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputNotFoundError, OutputExistsError

NAME_MAX = 255  # bytes in one file name on every common file system
TEMP_SUFFIX = ".partial"
_NODE = os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", "")
_HOST = hashlib.sha256(_NODE.encode("utf-8", "surrogateescape")).hexdigest()[:8]
_TEMP = re.compile(r"^\.(?P<stem>.*)\.lorareg-(?P<host>[0-9a-f]{8})-(?P<pid>\d{1,10})-[0-9a-f]{8}\.partial$", re.DOTALL)
# What earlier versions named their temporaries (tempfile.mkstemp: no owner recorded).
_LEGACY_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.partial$", re.DOTALL)


def temp_name(name: str) -> str:
    """A temporary name for writing ``name``, owned by this process, at most :data:`NAME_MAX` bytes.

    The part taken from ``name`` is shortened when needed, so outputs whose own name is close to
    the limit can still be written.
    """
    tail = f".lorareg-{_HOST}-{os.getpid()}-{os.urandom(4).hex()}{TEMP_SUFFIX}"
    budget = NAME_MAX - 1 - len(tail)
    stem = os.fsencode(name)[:budget]
    return "." + os.fsdecode(stem) + tail


def _owner_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        return False
    return False


def _stale(name: str) -> bool:
    """True for a temporary of this machine whose writing process no longer exists."""
    match = _TEMP.match(name)
    return match is not None and match["host"] == _HOST and _owner_gone(int(match["pid"]))


def sweep_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that dead lorareg processes of this machine left in ``folder``; return them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _stale(entry.name):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def leftovers(folder: str | os.PathLike) -> list[Path]:
    """Temporaries in ``folder`` that no running lorareg process is writing: ours whose process is
    gone, and those of earlier versions (which did not record their owner)."""
    found = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return found
    for name in names:
        match = _TEMP.match(name)
        if (match is not None and _stale(name)) or (match is None and _LEGACY_TEMP.match(name)):
            found.append(Path(folder) / name)
    return found


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file or folder: the same path once links are
    resolved, or the same file on disk (hard links, case-insensitive file systems)."""
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def refuse_input_as_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Raise :class:`OutputExistsError` when ``path`` is one of ``inputs`` (under any spelling)."""
    for source in inputs:
        if same_file(path, source):
            raise OutputExistsError(f"{path} is also an input ({source})",
                                    "Write the result to another path; the input is still being read")


def check_output(path: str | os.PathLike, force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output path that exists (unless ``force``) or whose folder does not exist.

    An output that is one of ``inputs`` is refused even with ``force``: the input is still being read.
    """
    path = Path(path)
    if not path.parent.exists():
        raise InputNotFoundError(f"the output folder {path.parent} does not exist", "Create it first")
    refuse_input_as_output(path, inputs)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists", "Pass --force to overwrite it, or choose another output path")
    if path.is_dir() and not path.is_symlink():
        raise OutputExistsError(f"{path} is a folder", "Give the path of a file")
    return path


def refuse_overwrite(path: str | os.PathLike, force: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output that exists as a file or a non-empty folder (unless ``force``), or is an input.

    For checks made before the work starts; an empty folder counts as free (a folder output may
    have been created for it). The writer checks again when it writes.
    """
    path = Path(path)
    refuse_input_as_output(path, inputs)
    if force or not path.exists():
        return
    if not path.is_dir() or any(path.iterdir()):
        raise OutputExistsError(f"{path} already exists", "Pass --force to overwrite it, or choose another output path")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds.

    Stale temporaries of dead lorareg processes in the same folder are removed first.
    """
    path = Path(path)
    sweep_stale(path.parent)
    tmp_path = path.parent / temp_name(path.name)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    finally:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; move its files into ``path`` if the block succeeds.

    Files already in ``path`` that the block did not write are left alone; each written file
    replaces its namesake by an atomic rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=False, exist_ok=True)
    sweep_stale(path.parent)
    tmp = path.parent / temp_name(path.name)
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
        path.mkdir(exist_ok=True)
        for source in sorted(tmp.rglob("*")):
            if source.is_file():
                target = path / source.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(source, 0o644)
                os.replace(source, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

