"""Check the catalog against the disk: re-hash every recorded file and report what changed.

Each file of an adapter is one of: ``ok`` (same bytes), ``metadata-changed`` (same tensor data,
so the same adapter, but its metadata was edited: the record is updated), ``changed`` (the
tensor data differs: it is no longer this adapter), ``missing``, or ``moved`` (missing here,
but a file with the same bytes was found at another path, which is recorded instead). Moves
are found among paths the catalog already knows and in the folders given with ``search``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loralib.errors import LoraError
from loralib.files.hashes import hash_file

from .catalog import Catalog
from .describe import absolute
from .schema import now, write

PROBLEMS = ("changed", "missing", "unreadable")


@dataclass
class VerifyItem:
    """The verdict on one recorded file."""

    name: str
    path: str
    status: str
    detail: str = ""
    new_path: str | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)


@dataclass
class VerifyReport:
    """Every verdict, and counts by status."""

    items: list[VerifyItem] = field(default_factory=list)

    def count(self, status: str) -> int:
        """How many files have ``status``."""
        return sum(item.status == status for item in self.items)

    @property
    def problems(self) -> list[VerifyItem]:
        """Files that are missing, changed or unreadable."""
        return [item for item in self.items if item.status in PROBLEMS]

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        statuses = ("ok", "metadata-changed", "moved", *PROBLEMS)
        return {"checked": len(self.items), **{s: self.count(s) for s in statuses},
                "files": [item.to_dict() for item in self.items]}


def _candidates(folders: Iterable[str | os.PathLike]) -> dict[int, list[Path]]:
    """``.safetensors`` files under ``folders``, by size (a cheap first filter for moved files)."""
    by_size: dict[int, list[Path]] = {}
    for folder in folders:
        for path in Path(folder).expanduser().rglob("*.safetensors"):
            try:
                by_size.setdefault(path.stat().st_size, []).append(absolute(path))
            except OSError:
                continue
    return by_size


def verify(catalog: Catalog, references: Iterable[str] = (), *, search: Iterable[str | os.PathLike] = (),
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Re-hash the files of the named entries (all entries when none are named); see the module docstring."""
    references = list(references)
    if references:
        ids = [catalog.get(ref).id for ref in references]
        rows = catalog.conn.execute(
            f"SELECT f.path, f.sha256, f.adapter_id, a.name, a.tensor_sha256 FROM files f JOIN adapters a "
            f"ON a.id = f.adapter_id WHERE f.adapter_id IN ({','.join('?' * len(ids))}) ORDER BY a.name", ids).fetchall()
    else:
        rows = catalog.conn.execute("SELECT f.path, f.sha256, f.adapter_id, a.name, a.tensor_sha256 FROM files f "
                                    "JOIN adapters a ON a.id = f.adapter_id ORDER BY a.name COLLATE NOCASE").fetchall()
    known_paths = {r[0] for r in catalog.conn.execute("SELECT path FROM files")}
    by_size = _candidates(search)
    report = VerifyReport()
    for done, (path, sha256, adapter_id, name, tensor_sha256) in enumerate(rows, 1):
        report.items.append(_check(catalog, Path(path), sha256, adapter_id, name, tensor_sha256, known_paths, by_size))
        if progress is not None:
            progress(done, len(rows))
    return report


def _check(catalog: Catalog, path: Path, sha256: str | None, adapter_id: int, name: str, tensor_sha256: str,
           known_paths: set[str], by_size: dict[int, list[Path]]) -> VerifyItem:
    if not path.is_file():
        return _missing(catalog, path, sha256, adapter_id, name, tensor_sha256, known_paths, by_size)
    try:
        hashes = hash_file(path)
    except (LoraError, OSError) as exc:
        _set_state(catalog, path, "damaged", str(exc))
        return VerifyItem(name, str(path), "unreadable", str(exc))
    stat = path.stat()
    if hashes.sha256 == sha256:
        _update_file(catalog, path, hashes.sha256, stat, "ok")
        return VerifyItem(name, str(path), "ok")
    if hashes.tensor_sha256 == tensor_sha256:
        catalog.add(path, hashes=hashes)  # same adapter: refresh what its metadata says
        return VerifyItem(name, str(path), "metadata-changed", "same tensor data, edited metadata")
    _set_state(catalog, path, "changed", f"tensor data is now {hashes.tensor_sha256[:12]}")
    return VerifyItem(name, str(path), "changed",
                      f"its tensor data changed (A1111 hash now {hashes.tensor_sha256[:12]}, was {tensor_sha256[:12]}); "
                      f"`lorareg add {path}` records it as a new adapter")


def _missing(catalog: Catalog, path: Path, sha256: str | None, adapter_id: int, name: str, tensor_sha256: str,
             known_paths: set[str], by_size: dict[int, list[Path]]) -> VerifyItem:
    """A recorded file that is gone: look for the same bytes elsewhere before calling it missing."""
    twin = catalog.conn.execute("SELECT path FROM files WHERE adapter_id = ? AND path != ? AND state = 'ok'",
                                (adapter_id, str(path))).fetchall()
    for (other,) in twin:
        if Path(other).is_file():
            with write(catalog.conn):
                catalog.conn.execute("DELETE FROM files WHERE path = ?", (str(path),))
            return VerifyItem(name, str(path), "moved", "another copy is recorded", other)
    size = catalog.conn.execute("SELECT size FROM files WHERE path = ?", (str(path),)).fetchone()
    for candidate in by_size.get(size[0] if size else -1, []):
        if str(candidate) in known_paths:
            continue
        try:
            hashes = hash_file(candidate)
        except (LoraError, OSError):
            continue
        if hashes.sha256 == sha256 or hashes.tensor_sha256 == tensor_sha256:
            with write(catalog.conn):
                catalog.conn.execute("UPDATE files SET path = ?, sha256 = ?, mtime_ns = ?, state = 'ok', problem = NULL, "
                                     "seen_at = ? WHERE path = ?", (str(candidate), hashes.sha256,
                                                                     candidate.stat().st_mtime_ns, now(), str(path)))
            known_paths.add(str(candidate))
            return VerifyItem(name, str(path), "moved", "found with the same content", str(candidate))
    _set_state(catalog, path, "missing", None)
    detail = "not found" + ("" if by_size else "; `--search FOLDER` looks for moved files")
    return VerifyItem(name, str(path), "missing", detail)


def _set_state(catalog: Catalog, path: Path, state: str, problem: str | None) -> None:
    with write(catalog.conn):
        catalog.conn.execute("UPDATE files SET state = ?, problem = ?, seen_at = ? WHERE path = ?",
                             (state, problem, now(), str(path)))


def _update_file(catalog: Catalog, path: Path, sha256: str, stat: os.stat_result, state: str) -> None:
    with write(catalog.conn):
        catalog.conn.execute("UPDATE files SET sha256 = ?, size = ?, mtime_ns = ?, state = ?, problem = NULL, "
                             "seen_at = ? WHERE path = ?", (sha256, stat.st_size, stat.st_mtime_ns, state, now(), str(path)))
