"""Write outputs so that a failure never leaves a half-written file behind.

Files are written under a temporary name in the destination folder and renamed into place
only when complete; an existing output is replaced only when the caller passes ``force``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputNotFoundError, OutputExistsError


def check_output(path: str | os.PathLike, force: bool = False, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse an output path that exists (unless ``force``) or whose folder does not exist.

    An output that is one of ``inputs`` is refused even with ``force``: the input is still being read.
    """
    path = Path(path)
    if not path.parent.exists():
        raise InputNotFoundError(f"the output folder {path.parent} does not exist", "Create it first")
    resolved = path.resolve()
    for source in inputs:
        if Path(source).resolve() == resolved:
            raise OutputExistsError(f"{path} is also an input", "Write the result to another path")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists", "Pass --force to overwrite it, or choose another output path")
    return path


def refuse_overwrite(path: str | os.PathLike, force: bool = False) -> None:
    """Refuse an output that exists as a file or a non-empty folder, unless ``force``.

    For checks made before the work starts; an empty folder counts as free (a folder output may
    have been created for it). The writer checks again when it writes.
    """
    path = Path(path)
    if force or not path.exists():
        return
    if not path.is_dir() or any(path.iterdir()):
        raise OutputExistsError(f"{path} already exists", "Pass --force to overwrite it, or choose another output path")


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; move its files into ``path`` if the block succeeds.

    Files already in ``path`` that the block did not write are left alone; each written file
    replaces its namesake by an atomic rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=False, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
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
