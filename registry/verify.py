"""Check the catalog against the disk: re-hash every recorded file and report what changed.

Each file of an adapter is one of: ``ok`` (same bytes), ``metadata-changed`` (same content as
stored — tensor names, dtypes, shapes and data — so the same adapter, but its metadata was edited:
the record is updated), ``changed`` (the content differs: it is no longer this adapter), ``missing``,
or ``moved`` (missing here,
but a file with the same bytes was found at another path, which is recorded instead). Moves
are found among paths the catalog already knows and in the folders given with ``search``.
Temporaries that interrupted writes left beside the files (see :func:`loralib.files.atomic.leftovers`)
are listed too; the next write into their folder removes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loralib.errors import LoraError
from loralib.files.atomic import leftovers
from loralib.formats.layout import adapter_root

from .catalog import Catalog
from .describe import adapter_hashes
from .paths import absolute
from .records import Entry, FileRecord

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
    leftovers: list[str] = field(default_factory=list)  # temporaries of interrupted writes beside the files

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
                "files": [item.to_dict() for item in self.items], "leftovers": self.leftovers}


def _candidates(folders: Iterable[str | os.PathLike]) -> dict[int, list[Path]]:
    """``.safetensors`` files under ``folders``, by size (a cheap first filter for moved files)."""
    by_size: dict[int, list[Path]] = {}
    for folder in folders:
        for path in Path(folder).expanduser().rglob("*.safetensors"):
            try:
                if not path.is_file():  # a FIFO or device would block the hashing
                    continue
                by_size.setdefault(path.stat().st_size, []).append(absolute(path))
            except OSError:
                continue
    return by_size


def verify(catalog: Catalog, references: Iterable[str] = (), *, search: Iterable[str | os.PathLike] = (),
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Re-hash the files of the named entries (all entries when none are named); see the module docstring."""
    rows = catalog.adapter_files(references)
    known_paths = catalog.known_paths()
    by_size = _candidates(search)
    report = VerifyReport()
    for done, (record, entry) in enumerate(rows, 1):
        report.items.append(_check(catalog, record, entry, known_paths, by_size))
        if progress is not None:
            progress(done, len(rows))
    folders = dict.fromkeys(folder for record, _ in rows for folder in _folders(Path(record.path)))
    report.leftovers = [str(path) for folder in folders for path in leftovers(folder)]
    return report


def _folders(path: Path) -> list[Path]:
    """Where an interrupted write of this file would have left its temporary: its folder, and for
    a component of an adapter folder (PEFT), the folders above it."""
    root = adapter_root(path) if path.is_file() else path
    return list(dict.fromkeys([path.parent, root.parent, *([root] if root.is_dir() else [])]))


def _check(catalog: Catalog, record: FileRecord, entry: Entry, known_paths: set[str],
           by_size: dict[int, list[Path]]) -> VerifyItem:
    path, name = Path(record.path), entry.name
    if not path.is_file():
        return _missing(catalog, record, entry, known_paths, by_size)
    try:
        hashes = adapter_hashes(path)
    except (LoraError, OSError) as exc:
        catalog.set_file_state(path, "damaged", str(exc))
        return VerifyItem(name, str(path), "unreadable", str(exc))
    stat = path.stat()
    if hashes.sha256 == record.sha256:
        catalog.file_seen(path, sha256=hashes.sha256, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        return VerifyItem(name, str(path), "ok")
    if hashes.identity == entry.identity:
        catalog.add(path, hashes=hashes)  # same adapter: refresh what its metadata says
        return VerifyItem(name, str(path), "metadata-changed", "same tensors, edited metadata")
    catalog.set_file_state(path, "changed", f"its content is now {hashes.identity[:12]}")
    return VerifyItem(name, str(path), "changed",
                      f"its tensors changed (A1111 hash now {hashes.tensor_sha256[:12]}, was {entry.tensor_sha256[:12]}); "
                      f"`lorareg add {path}` records it as a new adapter")


def _missing(catalog: Catalog, record: FileRecord, entry: Entry, known_paths: set[str],
             by_size: dict[int, list[Path]]) -> VerifyItem:
    """A recorded file that is gone: look for the same bytes elsewhere before calling it missing."""
    path, name = Path(record.path), entry.name
    for other in catalog.other_copies(entry.id, path):
        if Path(other).is_file():
            catalog.forget_file(path)
            return VerifyItem(name, str(path), "moved", "another copy is recorded", other)
    for candidate in by_size.get(record.size if record.size is not None else -1, []):
        if str(candidate) in known_paths:
            continue
        try:
            hashes = adapter_hashes(candidate)
        except (LoraError, OSError):
            continue
        if hashes.sha256 == record.sha256 or hashes.identity == entry.identity:
            catalog.move_file(path, candidate, sha256=hashes.sha256, mtime_ns=candidate.stat().st_mtime_ns)
            known_paths.add(str(candidate))
            return VerifyItem(name, str(path), "moved", "found with the same content", str(candidate))
    catalog.set_file_state(path, "missing")
    detail = "not found" + ("" if by_size else "; `--search FOLDER` looks for moved files")
    return VerifyItem(name, str(path), "missing", detail)
