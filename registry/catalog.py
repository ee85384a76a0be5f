"""The catalog of adapters: add, look up, list, search, tag, remove, and record outputs with their parents.

::

    from lorareg.registry.catalog import Catalog
    with Catalog() as catalog:                       # $LORAREG_HOME or the per-user data folder
        entry = catalog.add("pixel.safetensors", tags=["style"], triggers=["pxl style"]).entry
        catalog.search("pixel")                       # full-text, best match first
        catalog.get("pixel")                          # by name, hash prefix or file path

An adapter is identified by its content as stored — tensor names, dtypes, shapes and data, with
the metadata left out (``identity``) — so copies of a file and files that differ only in metadata
are one entry with several paths, while a conversion to other key names is an entry of its own
(linked to its input as a parent, and to every other copy of the same ΔW by its fingerprint:
:meth:`Catalog.same_adapter`). Reading imports neither torch nor
sqlite-utils (which creates and migrates the schema, see :mod:`lorareg.registry.schema`); every write runs
in a ``BEGIN IMMEDIATE`` transaction with bound parameters.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from loralib.errors import InputNotFoundError, InvalidArgumentError, LoraError
from loralib.records import InputRecord, OperationRecord

from .home import catalog_path
from .records import SUMMARY_COLUMNS, Entry, FileRecord, ParentRecord, dumps, unique
from .schema import catalog_error, connect, now, write

if TYPE_CHECKING:
    from loralib.files.hashes import Deferred, FileHashes

    from .describe import FileFacts, FileRow

HASH_PREFIX = re.compile(r"^(?:sha256:|0x)?([0-9a-fA-F]{8,64})$")
SORTS = {"name": "a.name COLLATE NOCASE", "added": "a.added_at DESC, a.id DESC",
         "updated": "a.updated_at DESC, a.id DESC", "size": "a.size DESC, a.id"}
# The index each sort order walks (schema.py creates them; a catalog without one sorts the slow way).
SORT_INDEXES = {"name": "adapters_name", "added": "idx_adapters_added_at", "updated": "idx_adapters_updated_at",
                "size": "idx_adapters_size"}
_FTS_SYNTAX = re.compile(r'["*()^:+{}]|\b(AND|OR|NOT|NEAR)\b')
MAX_NAME = 200
PARENT_COLUMNS = ("identity", "tensor_sha256", "sha256", "file", "path", "format", "weight")


class Stored(NamedTuple):
    """What storing one file did: the adapter's id, whether the entry is new, whether the path is new
    to it, and the entry's name before a rename."""

    adapter_id: int
    created: bool
    new_path: bool
    renamed_from: str | None = None


@dataclass
class AddResult:
    """What :meth:`Catalog.add` did: the entry, whether it is new, whether the path is new to it, and
    the name it had before a rename (None when it was not renamed)."""

    entry: Entry
    created: bool
    new_path: bool
    renamed_from: str | None = None


@dataclass
class RemoveResult:
    """What :meth:`Catalog.remove` did: the removed entry and the files deleted (if asked)."""

    entry: Entry
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # files whose content changed since they were recorded


def check_name(name: str) -> str:
    """A valid catalog name (trimmed), or :class:`InvalidArgumentError`.

    Any text works (quotes, unicode, SQL characters) except slashes, which would read as a
    path or a Hub repo id, and control characters.
    """
    cleaned = " ".join(str(name).split())
    if not cleaned:
        raise InvalidArgumentError("an adapter name cannot be empty")
    if re.search(r"[\x00-\x1f\x7f/\\]", str(name).strip()):
        raise InvalidArgumentError(f"the name {name!r} contains a slash or a control character",
                                   "Slashes would read as a path or a Hub repo id; choose another name")
    if len(cleaned) > MAX_NAME:
        raise InvalidArgumentError(f"the name is {len(cleaned)} characters long (the limit is {MAX_NAME})")
    return cleaned


def clean_tags(tags: Iterable[str]) -> list[str]:
    """Tags as stored: trimmed, lower-case, without repeats."""
    return unique([" ".join(str(t).split()).lower() for t in tags if str(t).strip()])


def fts_query(text: str) -> str:
    """The FTS5 query for a search string.

    Plain words match as prefixes, all of them required (``pix art`` finds "pixel-art"). A
    string using FTS5 syntax (quotes, ``*``, ``AND``/``OR``/``NOT``, parentheses, ``col:``) is
    passed through as written.
    """
    text = text.strip()
    if not text:
        raise InvalidArgumentError("the search text is empty", "Give at least one word")
    if _FTS_SYNTAX.search(text):
        return text
    words = [w for w in text.split() if re.search(r"\w", w)]
    if not words:
        raise InvalidArgumentError(f"there is no word to search for in {text!r}", "Give at least one word or name")
    return " ".join('"' + w.replace('"', '""') + '"*' for w in words)


def _sqlite_errors_translated(cls: type) -> type:
    """Make every public method of ``cls`` raise :class:`CatalogError` (one line naming the database
    file and what to do) instead of a raw ``sqlite3`` error."""

    def translating(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except sqlite3.Error as exc:
                raise catalog_error(self.path, exc) from exc
            except UnicodeEncodeError as exc:  # a name or path with bytes that are not UTF-8 (SQLite stores text)
                text = exc.object if isinstance(exc.object, str) else ""
                shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") \
                    if text else "a name or path"
                raise InvalidArgumentError(f"{shown[:200]!r} is not valid UTF-8 text, which the catalog cannot store "
                                           "or look up", "Rename the file or folder") from exc
        return wrapper

    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(value) and not inspect.isgeneratorfunction(value):
            setattr(cls, name, translating(value))
    return cls


@_sqlite_errors_translated
class Catalog:
    """An open catalog database. Use as a context manager, or call :meth:`close`.

    Every method raises :class:`~lorareg.registry.schema.CatalogError` for a database that cannot
    be used (damaged, read-only, on a full disk), never a raw ``sqlite3`` error.
    """

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.path = catalog_path(home)
        self.conn = connect(self.path)
        self.conn.row_factory = sqlite3.Row

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database connection."""
        self.conn.close()

    # -- looking up ------------------------------------------------------------------------ #

    def _entries(self, where: str, params: Sequence = (), columns: Sequence[str] | None = None,
                 tail: str = "") -> list[Entry]:
        cols = ", ".join(f"a.{c}" for c in columns) if columns else "a.*"
        rows = self.conn.execute(f"SELECT {cols} FROM adapters a WHERE {where} {tail}", params).fetchall()
        return [Entry.from_row(r) for r in rows]

    def by_id(self, adapter_id: int) -> Entry | None:
        """The entry with database id ``adapter_id`` (all fields)."""
        found = self._entries("a.id = ?", (adapter_id,))
        return found[0] if found else None

    def by_name(self, name: str) -> Entry | None:
        """The entry named ``name`` (case-insensitive)."""
        found = self._entries("a.name = ? COLLATE NOCASE", (" ".join(name.split()),))
        return found[0] if found else None

    def file_hashes(self, path: str | os.PathLike, size: int, mtime_ns: int) -> FileHashes | None:
        """The hashes recorded for the adapter whose main file is ``path`` (the file itself, or a PEFT
        folder's weights) when that file has not changed since (the same size and modification time,
        as ``scan`` trusts); None when unknown or changed. The identity returned is the adapter's, so
        it stands for the whole adapter only when that file is its one weights file (which
        :func:`.known.known_hashes` checks before asking)."""
        from loralib.files.hashes import FileHashes

        from .upgrade_v4 import placeholder_identity

        row = self.conn.execute(
            "SELECT f.sha256, a.tensor_sha256, a.legacy, a.identity FROM files f JOIN adapters a ON a.id = f.adapter_id "
            "WHERE f.path = ? AND f.size = ? AND f.mtime_ns = ? AND f.state = 'ok'",
            (str(path), size, mtime_ns)).fetchone()
        if row is None or not all(row) or row["identity"] == placeholder_identity(row["tensor_sha256"]):
            return None
        return FileHashes(row["sha256"], row["tensor_sha256"], row["legacy"], row["identity"])

    def by_identity(self, identity: str) -> Entry | None:
        """The entry with this identity (its content as stored)."""
        found = self._entries("a.identity = ?", (identity.lower(),))
        return found[0] if found else None

    def by_tensor_hash(self, tensor_sha256: str) -> Entry | None:
        """The first entry (oldest) whose main file's tensor data has this SHA-256.

        Several entries may share a tensor hash (the same tensors under other key names); see
        :meth:`with_tensor_hash` for all of them.
        """
        found = self.with_tensor_hash(tensor_sha256)
        return found[0] if found else None

    def with_tensor_hash(self, tensor_sha256: str) -> list[Entry]:
        """Every entry whose main file's tensor data has this SHA-256, oldest first."""
        return self._entries("a.tensor_sha256 = ?", (tensor_sha256.lower(),), tail="ORDER BY a.id")

    def by_path(self, path: str | os.PathLike) -> Entry | None:
        """The entry one of whose files is at ``path`` (a file, or a PEFT folder)."""
        from loralib.formats.layout import main_file

        from .paths import absolute

        target = absolute(path)
        candidates = [str(target), str(main_file(target))] if target.exists() else [str(target)]
        for candidate in candidates:
            found = self._entries("a.id = (SELECT adapter_id FROM files WHERE path = ?)", (candidate,))
            if found:
                return found[0]
        return None

    def by_hash_prefix(self, text: str) -> list[Entry]:
        """Entries whose tensor SHA-256 (A1111/AutoV3), file SHA-256 (AutoV2), identity or legacy hash starts with ``text``.

        ``text`` is at least 8 hex digits, optionally written ``sha256:…`` or ``0x…``.
        """
        match = HASH_PREFIX.match(text.strip())
        if match is None:
            return []
        prefix = match.group(1).lower()
        upper = prefix + "g"  # 'g' sorts after every hex digit: a range scan on the index
        where = ("a.tensor_sha256 >= ?1 AND a.tensor_sha256 < ?2 OR a.sha256 >= ?1 AND a.sha256 < ?2 "
                 "OR a.identity >= ?1 AND a.identity < ?2 "
                 "OR a.id IN (SELECT adapter_id FROM files WHERE sha256 >= ?1 AND sha256 < ?2)")
        params: tuple = (prefix, upper)
        if len(prefix) == 8:
            where += " OR a.legacy = ?1"
        return self._entries(where, params, tail="ORDER BY a.name COLLATE NOCASE LIMIT 20")

    def find(self, reference: str) -> Entry | None:
        """The entry for a name, a hash prefix or a file path; None when nothing matches.

        Raises :class:`InvalidArgumentError` when a hash prefix matches several entries.
        """
        entry = self.by_name(reference)
        if entry is not None:
            return entry
        matches = self.by_hash_prefix(reference)
        if len(matches) > 1:
            names = ", ".join(e.name for e in matches[:5])
            raise InvalidArgumentError(f"the hash prefix {reference} matches {len(matches)} adapters ({names})",
                                       "Give more digits of the hash, or the name")
        if matches:
            return matches[0]
        if os.path.exists(os.path.expanduser(reference)):
            return self.by_path(reference)
        return None

    def get(self, reference: str) -> Entry:
        """Like :meth:`find`, but raises :class:`InputNotFoundError` when nothing matches."""
        entry = self.find(reference)
        if entry is None:
            if os.path.exists(os.path.expanduser(reference)):
                raise InputNotFoundError(f"{reference} is not in the catalog", f"Add it with: lorareg add {reference}")
            raise InputNotFoundError(f"no adapter named {reference!r} in the catalog",
                                     "See `lorareg list` or `lorareg search`; hash prefixes need at least 8 hex digits")
        return entry

    def files(self, entry: Entry) -> list[FileRecord]:
        """Every path recorded for ``entry``, usable ones first."""
        rows = self.conn.execute(
            "SELECT path, size, mtime_ns, sha256, state, problem, seen_at FROM files WHERE adapter_id = ? "
            "ORDER BY state != 'ok', seen_at DESC", (entry.id,)).fetchall()
        return [FileRecord(**dict(r)) for r in rows]

    def local_path(self, entry: Entry) -> Path:
        """A path on this machine that loaders accept for ``entry`` (a file or a PEFT folder)."""
        from loralib.formats.layout import adapter_root

        for record in self.files(entry):
            path = Path(record.path)
            if record.state == "ok" and path.is_file():
                return adapter_root(path)
        for record in self.files(entry):
            if Path(record.path).is_file():
                return adapter_root(Path(record.path))
        hint = (f"Pull it again with: lorareg pull {entry.source_repo}" if entry.source_repo
                else "Run `lorareg verify` to look for moved files, or `lorareg scan FOLDER`")
        raise InputNotFoundError(f"the catalog entry {entry.name!r} has no file on this machine any more", hint)

    def parents(self, entry: Entry) -> list[ParentRecord]:
        """The inputs of the operation that made ``entry`` (with their names when they are in the catalog)."""
        rows = self.conn.execute(
            "SELECT position, tensor_sha256, sha256, file, path, format, weight, identity FROM parents "
            "WHERE child_id = ? ORDER BY position", (entry.id,)).fetchall()
        parents = [ParentRecord(*r[:7], identity=r[7]) for r in rows]
        for parent in parents:
            found = self.parent_entry(parent, child_id=entry.id)
            parent.name = found.name if found is not None else None
        return parents

    def parent_entry(self, parent: ParentRecord | InputRecord, *, child_id: int | None = None) -> Entry | None:
        """The catalog entry of a recorded input, or None when it is not in the catalog.

        An input recorded with its identity is that entry. Older histories record only the tensor
        hash, which the same tensors under other key names share: then the entry is the one whose
        format the record names, else the one with a file of the recorded name, else the only
        candidate (never the child itself).
        """
        if parent.identity:
            found = self.by_identity(parent.identity)
            return found if found is None or found.id != child_id else None
        if not parent.tensor_sha256:
            return None
        candidates = [e for e in self.with_tensor_hash(parent.tensor_sha256) if e.id != child_id]
        if len(candidates) > 1 and parent.format:
            candidates = [e for e in candidates if e.format == parent.format] or candidates
        if len(candidates) > 1 and parent.file:
            named = [e for e in candidates
                     if any(os.path.basename(f.path) == parent.file or os.path.basename(os.path.dirname(f.path)) ==
                            parent.file for f in self.files(e))]
            candidates = named or candidates
        return candidates[0] if len(candidates) == 1 else None

    def children(self, entry: Entry) -> list[Entry]:
        """Entries made from ``entry`` by an operation."""
        rows = self.conn.execute(
            "SELECT child_id, position, tensor_sha256, sha256, file, path, format, weight, identity FROM parents "
            "WHERE identity = ?1 OR (identity IS NULL AND tensor_sha256 = ?2)",
            (entry.identity, entry.tensor_sha256)).fetchall()
        ids: list[int] = []
        for child_id, *fields in rows:
            if child_id == entry.id or child_id in ids:
                continue
            parent = ParentRecord(*fields[:7], identity=fields[7])
            found = entry if parent.identity else self.parent_entry(parent, child_id=child_id)
            if found is not None and found.id == entry.id:
                ids.append(child_id)
        if not ids:
            return []
        return self._entries(f"a.id IN ({', '.join('?' * len(ids))})", ids, SUMMARY_COLUMNS,
                             "ORDER BY a.name COLLATE NOCASE")

    def same_adapter(self, entry: Entry) -> list[tuple[Entry, float]]:
        """Other entries holding the same ΔW (its fingerprint, up to rounding): other formats, key
        spellings, dtypes or factors of this adapter. Each with the fingerprints' cosine."""
        from loralib.fingerprint import BANDS, compare

        bands = [f"fp_band{i}" for i in range(BANDS)]
        row = self.conn.execute(f"SELECT fingerprint, {', '.join(bands)} FROM adapters WHERE id = ?",
                                (entry.id,)).fetchone()
        if row is None or row[0] is None:
            return []
        # candidates share a band key (an index lookup each); each is then compared in full
        where = " OR ".join(f"a.{band} = ?" for band in bands)
        found = []
        for other in self.conn.execute(f"SELECT a.id, a.fingerprint FROM adapters a WHERE ({where}) AND a.id != ?",
                                       [*row[1:], entry.id]).fetchall():
            comparison = compare(row[0], other[1])
            if comparison is not None and comparison.verdict == "same":
                found.append((other[0], comparison.similarity))
        entries = {e.id: e for e in self._entries(f"a.id IN ({', '.join('?' * len(found))})", [i for i, _ in found],
                                                   SUMMARY_COLUMNS)} if found else {}
        return sorted(((entries[i], s) for i, s in found if i in entries), key=lambda pair: pair[0].name.casefold())

    def fingerprints(self) -> list[tuple[int, bytes, float]]:
        """Every stored fingerprint of an undamaged entry: (id, fingerprint, norm)."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT id, fingerprint, fp_norm FROM adapters WHERE fingerprint IS NOT NULL AND NOT damaged ORDER BY id")]

    def fingerprint_notes(self) -> dict[str, int]:
        """Why entries have no fingerprint: reason -> how many."""
        rows = self.conn.execute("SELECT coalesce(fp_note, 'not computed yet'), count(*) FROM adapters "
                                 "WHERE fingerprint IS NULL GROUP BY 1 ORDER BY 2 DESC")
        return {r[0]: r[1] for r in rows}

    def entries_by_id(self, ids: Iterable[int]) -> dict[int, Entry]:
        """Entries (summary fields) by database id."""
        wanted = list(dict.fromkeys(ids))
        found: dict[int, Entry] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            for entry in self._entries(f"a.id IN ({', '.join('?' * len(chunk))})", chunk, SUMMARY_COLUMNS):
                found[entry.id] = entry
        return found

    def copies(self) -> list[tuple[str, list[tuple[str, int]]]]:
        """Files recorded in good order that share a SHA-256 with another: (sha256, [(path, adapter id)])."""
        rows = self.conn.execute(
            "SELECT sha256, path, adapter_id FROM files WHERE state = 'ok' AND adapter_id IS NOT NULL AND sha256 IN "
            "(SELECT sha256 FROM files WHERE state = 'ok' AND adapter_id IS NOT NULL GROUP BY sha256 "
            "HAVING count(*) > 1) ORDER BY sha256, path").fetchall()
        groups: dict[str, list[tuple[str, int]]] = {}
        for sha256, path, adapter_id in rows:
            groups.setdefault(sha256, []).append((path, adapter_id))
        return list(groups.items())

    def variants(self) -> list[tuple[int, list[tuple[str, str]]]]:
        """Entries recorded with files of different SHA-256 (the same tensors, other metadata): (id, [(path, sha256)])."""
        rows = self.conn.execute(
            "SELECT adapter_id, path, sha256 FROM files WHERE state = 'ok' AND adapter_id IN "
            "(SELECT adapter_id FROM files WHERE state = 'ok' AND adapter_id IS NOT NULL GROUP BY adapter_id "
            "HAVING count(DISTINCT sha256) > 1) ORDER BY adapter_id, path").fetchall()
        groups: dict[int, list[tuple[str, str]]] = {}
        for adapter_id, path, sha256 in rows:
            groups.setdefault(adapter_id, []).append((path, sha256))
        return list(groups.items())

    # -- listing and searching ------------------------------------------------------------- #

    @staticmethod
    def _filter_ids(architecture: str | None, format: str | None, tag: str | None,
                    base_model: str | None = None) -> tuple[str | None, list]:
        """A compound SELECT of the ids the filters keep (None: no filter), read from indexes only.

        Rows of ``adapters`` are large (metadata), so reading one costs a page: the filters
        intersect id sets from the architecture and format indexes, the tag table and the
        full-text index instead of testing rows.
        """
        parts, params = [], []
        if architecture:
            parts.append("SELECT id FROM adapters WHERE architecture = ?")
            params.append(architecture.lower())
        if format:
            parts.append("SELECT id FROM adapters WHERE format = ?")
            params.append(format.lower())
        if tag:
            parts.append("SELECT adapter_id FROM adapter_tags WHERE tag = ?")
            params.append(" ".join(tag.split()).lower())
        if base_model and re.search(r"\w", base_model):
            # The base model's name is among the metadata's words (ss_sd_model_name, modelspec.architecture…).
            parts.append("SELECT rowid FROM adapters_fts WHERE adapters_fts MATCH ?")
            params.append('keywords : "' + " ".join(base_model.split()).replace('"', '""') + '"')
        return (" INTERSECT ".join(parts) if parts else None), params

    def _in_order(self, ids: Sequence[int]) -> list[Entry]:
        """The summary entries of ``ids``, in that order."""
        if not ids:
            return []
        found = {e.id: e for e in self._entries(f"a.id IN ({', '.join('?' * len(ids))})", ids, SUMMARY_COLUMNS)}
        return [found[i] for i in ids if i in found]

    def list(self, *, architecture: str | None = None, format: str | None = None, tag: str | None = None,
             base_model: str | None = None, sort: str = "name", limit: int | None = 100,
             offset: int = 0) -> list[Entry]:
        """Entries (summary fields only), filtered and sorted; ``limit=None`` for all.

        ``base_model`` keeps entries whose metadata names it (words of ``ss_sd_model_name`` and the like).
        """
        if sort not in SORTS:
            raise InvalidArgumentError(f"unknown sort order {sort!r}", f"Choose one of {', '.join(SORTS)}")
        chosen, params = self._filter_ids(architecture, format, tag, base_model)
        return self._in_order(self._sorted_ids(chosen, params, sort, limit, offset))

    def _sorted_ids(self, chosen: str | None, params: list, sort: str, limit: int | None, offset: int) -> list[int]:
        """A page of the ids ``chosen`` selects, in ``sort`` order: the sort order's index is walked and
        the chosen ids kept, so no row is read."""
        index = f"INDEXED BY {SORT_INDEXES[sort]}" if SORT_INDEXES.get(sort) in self._indexes() else ""
        return [r[0] for r in self.conn.execute(
            f"SELECT a.id FROM adapters a {index} WHERE {f'a.id IN ({chosen})' if chosen else '1'} "
            f"ORDER BY {SORTS[sort]} LIMIT ? OFFSET ?", [*params, -1 if limit is None else limit, offset])]

    def _indexes(self) -> set[str]:
        if not hasattr(self, "_index_names"):
            self._index_names = {r[0] for r in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'adapters'")}
        return self._index_names

    def count(self, *, architecture: str | None = None, format: str | None = None, tag: str | None = None,
              base_model: str | None = None) -> int:
        """How many entries match the filters of :meth:`list`."""
        chosen, params = self._filter_ids(architecture, format, tag, base_model)
        sql = f"SELECT count(*) FROM ({chosen})" if chosen else "SELECT count(*) FROM adapters"
        return self.conn.execute(sql, params).fetchone()[0]

    def search(self, text: str, *, architecture: str | None = None, format: str | None = None, tag: str | None = None,
               base_model: str | None = None, sort: str | None = None, limit: int | None = 100,
               offset: int = 0) -> tuple[list[Entry], int]:
        """Full-text search over names, titles, tags, triggers, descriptions, metadata and Hub repos.

        Returns the best ``limit`` matches after skipping ``offset`` (summary fields) and the number
        of all matches; ``sort`` (one of :meth:`list`'s orders) orders them by that instead of by
        relevance. A query that is not valid FTS5 syntax raises :class:`InvalidArgumentError` with
        one clear line.
        """
        query = fts_query(text)
        if sort is not None and sort not in SORTS:
            raise InvalidArgumentError(f"unknown sort order {sort!r}", f"Choose one of {', '.join(SORTS)}")
        chosen, params = self._filter_ids(architecture, format, tag, base_model)
        condition = "adapters_fts MATCH ?" + (f" AND rowid IN ({chosen})" if chosen else "")
        try:
            if sort is not None:
                matching = "SELECT rowid FROM adapters_fts WHERE adapters_fts MATCH ?" + (
                    f" INTERSECT {chosen}" if chosen else "")
                ids = self._sorted_ids(matching, [query, *params], sort, limit, offset)
            else:  # ranked in the index alone; only the page's rows are read from the table
                ids = [r[0] for r in self.conn.execute(
                    f"SELECT rowid FROM adapters_fts WHERE {condition} ORDER BY rank LIMIT ? OFFSET ?",
                    [query, *params, -1 if limit is None else limit, offset])]
            if limit is None or 0 < len(ids) < limit:
                total = offset + len(ids)
            else:
                total = self.conn.execute(f"SELECT count(*) FROM adapters_fts WHERE {condition}",
                                          [query, *params]).fetchone()[0]
        except sqlite3.OperationalError as exc:
            reason = str(exc).removeprefix("fts5: ")
            raise InvalidArgumentError(
                f"the search {text!r} is not valid full-text query syntax ({reason})",
                'Search plain words, or quote exact text: lorareg search \'"pixel art"\'; '
                "operators are AND, OR, NOT, prefix*, and column:word") from exc
        return self._in_order(ids), total

    def facets(self, tags: int = 200) -> dict[str, list[tuple[str, int]]]:
        """The values the filters can take, with how many entries have each: architectures, formats, and
        the ``tags`` most used tags."""
        def grouped(sql: str, params: Sequence = ()) -> list[tuple[str, int]]:
            return [(r[0], r[1]) for r in self.conn.execute(sql, params).fetchall() if r[0]]

        return {"architecture": grouped("SELECT architecture, count(*) FROM adapters GROUP BY architecture "
                                        "ORDER BY count(*) DESC"),
                "format": grouped("SELECT format, count(*) FROM adapters GROUP BY format ORDER BY count(*) DESC"),
                "tag": grouped("SELECT tag, count(*) n FROM adapter_tags GROUP BY tag ORDER BY n DESC, tag LIMIT ?",
                               (tags,))}

    def samples_of(self, entries: Iterable[Entry]) -> dict[int, list[dict]]:
        """The sample images recorded for each of ``entries`` (list and search results leave them out)."""
        ids = [e.id for e in entries]
        rows = self.conn.execute(f"SELECT id, samples FROM adapters WHERE id IN ({', '.join('?' * len(ids))})",
                                 ids).fetchall() if ids else []
        return {r[0]: [s for s in _json_list(r[1]) if isinstance(s, dict)] for r in rows}

    def paths_of(self, entries: Iterable[Entry]) -> dict[int, list[str]]:
        """Every recorded path of each of ``entries``, usable ones first."""
        ids = [e.id for e in entries]
        found: dict[int, list[str]] = {i: [] for i in ids}
        if ids:
            for adapter_id, path in self.conn.execute(
                    f"SELECT adapter_id, path FROM files WHERE adapter_id IN ({', '.join('?' * len(ids))}) "
                    "ORDER BY state != 'ok', seen_at DESC", ids).fetchall():
                found[adapter_id].append(path)
        return found

    # -- writing --------------------------------------------------------------------------- #

    def add(self, path: str | os.PathLike, *, name: str | None = None, tags: Iterable[str] = (),
            triggers: Iterable[str] = (), description: str | None = None, samples: Iterable[dict] = (),
            source: dict | None = None, operation: dict | None = None, hashes: FileHashes | None = None,
            fallback_name: str | None = None, rename: bool = True) -> AddResult:
        """Record the adapter at ``path`` (a file or a PEFT/diffusers folder), reading its header and hashes.

        An adapter already in the catalog (same content as stored) gains the path, tags and
        triggers; a ``name`` renames it (``AddResult.renamed_from`` says so), or, with
        ``rename=False``, is refused with :class:`InvalidArgumentError`. ``source`` is
        ``{"source": "hub", "repo", "revision", "commit", "file"}`` for Hub downloads. A new entry
        without ``name`` is named ``fallback_name`` or after its file (with ``-2``, ``-3``… when taken).
        """
        from .describe import describe

        facts = describe(path, hashes)
        with write(self.conn):
            stored = self._store(facts, name=name, tags=tags, triggers=triggers, description=description,
                                 samples=samples, source=source, operation=operation, fallback_name=fallback_name,
                                 rename=rename)
        return AddResult(self.by_id(stored.adapter_id), stored.created, stored.new_path, stored.renamed_from)

    def add_many(self, facts: Iterable[FileFacts | FileRow]) -> list[Stored]:
        """Record several described files (their facts, or :meth:`FileFacts.row`) in one transaction
        (``scan`` does this in batches)."""
        with write(self.conn):
            return [self._store(f) for f in facts]

    def register_output(self, path: str | os.PathLike, operation: OperationRecord | Mapping[str, Any], *,
                        hashes: FileHashes | Deferred | None = None, name: str | None = None,
                        samples: Iterable[str | os.PathLike | dict] = ()) -> AddResult:
        """Record an adapter an operation just wrote, with its parents, weights and parameters.

        ``operation`` is the :class:`~loralib.records.OperationRecord` the operation returned (a
        writer's ``SaveResult.operation``), or its plain form: a mapping with ``"operation"``,
        ``"inputs"`` (input records, or paths), an optional ``"weights"`` list and ``"samples"``
        list, and the parameters. Inputs known only by path are identified through the catalog or
        by reading them; the file's own history record of the same operation fills in the rest.
        ``samples`` are images made with the adapter.
        """
        from .describe import describe
        from .lineage import as_record, history_record, parent_records
        from .samples import image_kind, sample_record

        record, named_samples = as_record(operation)
        facts = describe(path, hashes)
        parents = parent_records(self, record, facts)
        written = history_record(facts.metadata, record.operation)
        stored = OperationRecord(record.operation, parents, {**(written.params if written else {}), **record.params},
                                 {**(written.written if written else {}), **record.written})
        source = {"source": "output", "file": str(facts.root)}
        images = [s if isinstance(s, dict) else sample_record(s, weight=1.0, source=record.operation)
                  for s in [*named_samples, *samples] if isinstance(s, dict) or image_kind(s) is not None]
        with write(self.conn):
            result = self._store(facts, name=name, source=source, operation=stored.to_dict(), parents=parents,
                                 samples=images)
        return AddResult(self.by_id(result.adapter_id), result.created, result.new_path, result.renamed_from)

    def _store(self, facts: FileFacts | FileRow, *, name: str | None = None, tags: Iterable[str] = (),
               triggers: Iterable[str] = (), description: str | None = None, samples: Iterable[dict] = (),
               source: dict | None = None, operation: dict | None = None, parents: list[InputRecord] | None = None,
               fallback_name: str | None = None, rename: bool = True) -> Stored:
        """Insert or update the entry for ``facts``, its parents and its file row; runs inside :func:`write`."""
        from .describe import FileRow
        from .lineage import history_parents
        from .upgrade_v4 import placeholder_identity

        stamp = now()
        facts = facts if isinstance(facts, FileRow) else facts.row()
        columns = facts.columns
        # its entry, or one that kept a placeholder identity at the schema 4 upgrade (see upgrade_v4)
        found = self._entries("a.identity IN (?, ?)", (facts.identity, placeholder_identity(facts.tensor_sha256)))
        existing = min(found, key=lambda e: e.identity != facts.identity) if found else None
        renamed_from = None
        tags, user_triggers = clean_tags(tags), unique([" ".join(t.split()) for t in triggers if t.strip()])
        source_columns = _source_columns(source)
        if existing is None:
            if name:
                new_name = check_name(name)
                self._require_free(new_name, None)
            else:
                new_name = self._free_name(fallback_name or facts.default_name)
            row = {**columns, "name": new_name, "tags": dumps(tags), "user_triggers": dumps(user_triggers),
                   "triggers": dumps(unique(user_triggers + facts.file_triggers)),
                   "description": description or facts.metadata.get("modelspec.description"),
                   "samples": dumps(list(samples)), "operation": None if operation is None else dumps(operation),
                   "added_at": stamp, "updated_at": stamp, **(source_columns or {"source": "file"})}
            adapter_id = self._insert("adapters", row)
        else:
            adapter_id = existing.id
            all_triggers = unique(existing.user_triggers + user_triggers)
            changes = {**columns, "updated_at": stamp, "tags": dumps(unique(existing.tags + tags)),
                       "user_triggers": dumps(all_triggers),
                       "triggers": dumps(unique(all_triggers + facts.file_triggers))}
            if name and check_name(name) != existing.name:
                if not rename:
                    raise InvalidArgumentError(f"{facts.root} is already in the catalog as {existing.name!r}",
                                               f"Pass --rename to rename it to {check_name(name)!r}")
                self._require_free(check_name(name), existing.id)
                changes["name"] = check_name(name)
                renamed_from = existing.name
            if description:
                changes["description"] = description
            if samples:
                changes["samples"] = dumps(existing.samples + [s for s in samples if s not in existing.samples])
            if source_columns and (existing.source == "file" or source_columns["source"] == "hub"):
                changes.update(source_columns)
            if operation is not None and existing.operation is None:
                changes["operation"] = dumps(operation)
            self._update(adapter_id, changes)
        if existing is None or not self.conn.execute("SELECT 1 FROM parents WHERE child_id = ?", (adapter_id,)).fetchone():
            chosen = parents if parents is not None else history_parents(facts.metadata)
            for i, parent in enumerate(p for p in chosen if not _is_itself(p, facts)):
                self._insert("parents", {"child_id": adapter_id, "position": i,
                                         **{k: getattr(parent, k) for k in PARENT_COLUMNS}})
        owner = self.conn.execute("SELECT adapter_id FROM files WHERE path = ?", (facts.path,)).fetchone()
        self._upsert_file({"path": facts.path, "adapter_id": adapter_id, "size": facts.size,
                           "mtime_ns": facts.mtime_ns, "sha256": facts.sha256, "state": "ok",
                           "problem": None, "seen_at": stamp})
        return Stored(adapter_id, existing is None, owner is None or owner[0] != adapter_id, renamed_from)

    def _insert(self, table: str, row: dict) -> int:
        """Insert one row (column names come from this module, values are bound parameters)."""
        sql = f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"
        return self.conn.execute(sql, list(row.values())).lastrowid

    def _update(self, adapter_id: int, changes: dict) -> None:
        """Change columns of one adapter."""
        assignments = ", ".join(f"{column} = ?" for column in changes)
        self.conn.execute(f"UPDATE adapters SET {assignments} WHERE id = ?", [*changes.values(), adapter_id])

    def _upsert_file(self, row: dict) -> None:
        """Insert a ``files`` row, or update the one with the same path."""
        updates = ", ".join(f"{column} = excluded.{column}" for column in row if column != "path")
        self.conn.execute(f"INSERT INTO files ({', '.join(row)}) VALUES ({', '.join('?' * len(row))}) "
                          f"ON CONFLICT(path) DO UPDATE SET {updates}", list(row.values()))

    def _name_holder(self, name: str) -> int | None:
        row = self.conn.execute("SELECT id FROM adapters WHERE name = ? COLLATE NOCASE", (name,)).fetchone()
        return row[0] if row else None

    def _free_name(self, base: str) -> str:
        """``base``, or ``base-2``, ``base-3``… when it is taken."""
        candidate, n = base[:MAX_NAME], 1
        while self._name_holder(candidate) is not None:
            n += 1
            candidate = f"{base[:MAX_NAME - 8]}-{n}"
        return candidate

    def _require_free(self, name: str, owner_id: int | None) -> None:
        holder = self._name_holder(name)
        if holder is not None and holder != owner_id:
            other = self.by_id(holder)
            raise InvalidArgumentError(f"the name {name!r} is already used by another adapter "
                                       f"(A1111 hash {other.tensor_sha256[:12]})", "Choose another name with --name")

    def record_file(self, path: str, *, state: str, problem: str | None = None, size: int | None = None,
                    mtime_ns: int | None = None) -> None:
        """Remember a file that is not a usable adapter (``not-lora``, ``damaged``) so a rescan skips it."""
        with write(self.conn):
            self._upsert_file({"path": path, "adapter_id": None, "size": size, "mtime_ns": mtime_ns, "sha256": None,
                               "state": state, "problem": problem, "seen_at": now()})

    def update(self, reference: str, *, name: str | None = None, description: str | None = None,
               add_tags: Iterable[str] = (), remove_tags: Iterable[str] = (), add_triggers: Iterable[str] = (),
               remove_triggers: Iterable[str] = (), samples: Iterable[dict] = ()) -> Entry:
        """Change what the user controls: name, description, tags, trigger words, sample images."""
        with write(self.conn):
            entry = self.get(reference)
            changes: dict[str, Any] = {"updated_at": now()}
            if name is not None and check_name(name) != entry.name:
                self._require_free(check_name(name), entry.id)
                changes["name"] = check_name(name)
            if description is not None:
                changes["description"] = description or None
            drop = set(clean_tags(remove_tags))
            changes["tags"] = dumps([t for t in unique(entry.tags + clean_tags(add_tags)) if t not in drop])
            drop_triggers = {t.casefold() for t in remove_triggers}
            user = [t for t in unique(entry.user_triggers + [" ".join(t.split()) for t in add_triggers])
                    if t.casefold() not in drop_triggers]
            changes["user_triggers"] = dumps(user)
            changes["triggers"] = dumps([t for t in unique(user + entry.triggers) if t.casefold() not in drop_triggers])
            samples = list(samples)
            if samples:
                changes["samples"] = dumps(entry.samples + [s for s in samples if s not in entry.samples])
            self._update(entry.id, changes)
            return self.by_id(entry.id)

    def add_samples(self, entry: Entry, samples: Iterable[dict]) -> Entry:
        """Attach sample images (records from :func:`lorareg.registry.samples.sample_record`) to an entry;
        an image already attached (same path) is replaced by the new record."""
        with write(self.conn):
            current = self.by_id(entry.id)
            if current is None:
                raise InputNotFoundError(f"the catalog entry {entry.name!r} no longer exists")
            new = list(samples)
            paths = {s.get("path") for s in new}
            kept = [s for s in current.samples if s.get("path") not in paths]
            self._update(entry.id, {"samples": dumps(kept + new), "updated_at": now()})
            return self.by_id(entry.id)

    def tag(self, reference: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> Entry:
        """Add and remove tags of an entry."""
        return self.update(reference, add_tags=add, remove_tags=remove)

    def record_push(self, entry: Entry, record: dict) -> None:
        """Remember that ``entry`` was pushed to the Hub (``record``: repo, commit, files, date)."""
        with write(self.conn):
            current = self.by_id(entry.id)
            self._update(entry.id, {"hub": dumps(current.hub + [record]), "updated_at": now()})

    def remove(self, reference: str, *, delete_files: bool = False) -> RemoveResult:
        """Remove an entry from the catalog. Its files are deleted only when ``delete_files`` is true,
        and only those that still hold what the catalog recorded (the same SHA-256): a file whose
        content changed since (another adapter now lives at that path) is kept and listed in ``kept``."""
        from loralib.formats.layout import adapter_files, adapter_root

        with write(self.conn):
            entry = self.get(reference)
            records = self.files(entry)
            self.conn.execute("DELETE FROM adapters WHERE id = ?", (entry.id,))
        result = RemoveResult(entry)
        if delete_files:
            for record in records:
                path = Path(record.path)
                if not path.exists():
                    continue
                if not _still_recorded(path, record.sha256):
                    result.kept.append(str(path))
                    continue
                for file in adapter_files(adapter_root(path)):
                    try:
                        file.unlink()
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        raise LoraError(f"{entry.name} was removed from the catalog, but {file} could not be deleted: "
                                        f"{exc.strerror or exc}") from exc
                    result.deleted.append(str(file))
        return result

    # -- files: what scan and verify record ---------------------------------------------------- #

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction around several calls (nested use joins it)."""
        try:
            with write(self.conn):
                yield
        except sqlite3.Error as exc:
            raise catalog_error(self.path, exc) from exc

    def files_under(self, folder: str | os.PathLike) -> dict[str, tuple[int | None, int | None, str]]:
        """What the catalog recorded for files under ``folder``: path -> (size, mtime_ns, state).

        The state of a file whose adapter is flagged damaged (a truncated file) reads ``damaged``;
        one whose adapter has no fingerprint yet (recorded before fingerprints existed) reads ``stale``.
        """
        prefix = str(folder).rstrip(os.sep) + os.sep
        rows = self.conn.execute(
            "SELECT f.path, f.size, f.mtime_ns, CASE WHEN a.damaged THEN 'damaged' WHEN f.state = 'ok' AND "
            "a.fingerprint IS NULL AND a.fp_note IS NULL THEN 'stale' ELSE f.state END "
            "FROM files f LEFT JOIN adapters a ON a.id = f.adapter_id WHERE f.path >= ? AND f.path < ?",
            (prefix, prefix[:-1] + chr(ord(os.sep) + 1)))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def adapter_files(self, references: Iterable[str] = ()) -> list[tuple[FileRecord, Entry]]:
        """Every recorded file of the named entries (of all entries when none are named), by entry name."""
        ids = [self.get(ref).id for ref in references]
        where = f"WHERE f.adapter_id IN ({','.join('?' * len(ids))})" if ids else ""
        rows = self.conn.execute(
            "SELECT f.path, f.size, f.mtime_ns, f.sha256, f.state, f.problem, f.seen_at, a.id, a.name, a.tensor_sha256, "
            f"a.identity FROM files f JOIN adapters a ON a.id = f.adapter_id {where} ORDER BY a.name COLLATE NOCASE",
            ids).fetchall()
        return [(FileRecord(*r[:7]), Entry(id=r[7], name=r[8], tensor_sha256=r[9], identity=r[10])) for r in rows]

    def known_paths(self) -> set[str]:
        """Every path the catalog has recorded (adapters and files that are not)."""
        return {r[0] for r in self.conn.execute("SELECT path FROM files")}

    def file_record(self, path: str | os.PathLike) -> FileRecord | None:
        """What the catalog recorded at ``path``."""
        row = self.conn.execute("SELECT path, size, mtime_ns, sha256, state, problem, seen_at FROM files WHERE path = ?",
                                (str(path),)).fetchone()
        return FileRecord(**dict(row)) if row else None

    def other_copies(self, adapter_id: int, path: str | os.PathLike) -> list[str]:
        """Paths of an entry's other files last seen in good order."""
        rows = self.conn.execute("SELECT path FROM files WHERE adapter_id = ? AND path != ? AND state = 'ok'",
                                 (adapter_id, str(path)))
        return [r[0] for r in rows]

    def set_file_state(self, path: str | os.PathLike, state: str, problem: str | None = None) -> None:
        """Mark a recorded file ``ok``, ``missing``, ``changed`` or ``damaged`` (with what is wrong)."""
        with write(self.conn):
            self.conn.execute("UPDATE files SET state = ?, problem = ?, seen_at = ? WHERE path = ?",
                              (state, problem, now(), str(path)))

    def mark_missing(self, paths: Iterable[str]) -> None:
        """Mark recorded files that are gone as ``missing`` (their rows are kept)."""
        with write(self.conn):
            stamp = now()
            self.conn.executemany("UPDATE files SET state = 'missing', seen_at = ? WHERE path = ?",
                                  [(stamp, p) for p in paths])

    def file_seen(self, path: str | os.PathLike, *, sha256: str, size: int, mtime_ns: int) -> None:
        """Record that a file was found intact (same bytes): its hash, size and time, state ``ok``."""
        with write(self.conn):
            self.conn.execute("UPDATE files SET sha256 = ?, size = ?, mtime_ns = ?, state = 'ok', problem = NULL, "
                              "seen_at = ? WHERE path = ?", (sha256, size, mtime_ns, now(), str(path)))

    def move_file(self, old: str | os.PathLike, new: str | os.PathLike, *, sha256: str, mtime_ns: int) -> None:
        """Record that the file at ``old`` now lies at ``new``."""
        with write(self.conn):
            self.conn.execute("UPDATE files SET path = ?, sha256 = ?, mtime_ns = ?, state = 'ok', problem = NULL, "
                              "seen_at = ? WHERE path = ?", (str(new), sha256, mtime_ns, now(), str(old)))

    def forget_file(self, path: str | os.PathLike) -> None:
        """Drop the record of one path (the entry keeps its other files)."""
        with write(self.conn):
            self.conn.execute("DELETE FROM files WHERE path = ?", (str(path),))

    def pulled_from(self, repo_id: str, revision: str | None = None) -> list[Entry]:
        """Entries downloaded from ``repo_id`` (at ``revision``, a branch, tag or commit, when given), newest first."""
        return self._entries("a.source_repo = ?1 AND (?2 IS NULL OR a.source_revision = ?2 OR a.source_commit = ?2)",
                             (repo_id, revision), tail="ORDER BY a.updated_at DESC")


def _json_list(text: str | None) -> list:
    try:
        value = json.loads(text or "[]")
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []


def complete_names(prefix: str, home: str | os.PathLike | None = None, limit: int = 100) -> list[str]:
    """Catalog names starting with ``prefix`` (case-insensitive), for shell completion.

    Opens the catalog read-only and never creates or migrates one: fast, and silent (an empty
    list) when there is no catalog or it cannot be read.
    """
    path = catalog_path(home)
    if not path.is_file():
        return []
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=1.0)
        try:
            rows = conn.execute("SELECT name FROM adapters WHERE name LIKE ? ESCAPE '\\' "
                                "ORDER BY name COLLATE NOCASE LIMIT ?", (escaped + "%", limit)).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []
    return [r[0] for r in rows]


def _is_itself(parent: InputRecord, facts: FileRow) -> bool:
    """True for a recorded input that is the written adapter itself (a conversion that changed nothing).

    Older histories name inputs by tensor hash only, which a conversion to other key names keeps:
    such an input is the adapter itself only when its format is the same too.
    """
    if parent.identity:
        return parent.identity == facts.identity
    return parent.tensor_sha256 == facts.tensor_sha256 and parent.format in (None, facts.format)
def _still_recorded(path: Path, sha256: str | None) -> bool:
    """True when the file at ``path`` is a regular file whose SHA-256 is ``sha256``."""
    from loralib.files import special_kind
    from loralib.files.hashes import file_sha256

    if not sha256 or special_kind(path) is not None:
        return False
    try:
        return file_sha256(path) == sha256
    except OSError:
        return False


def _source_columns(source: dict | None) -> dict | None:
    if not source:
        return None
    return {"source": source.get("source", "file"), "source_repo": source.get("repo"),
            "source_revision": source.get("revision"), "source_commit": source.get("commit"),
            "source_file": source.get("file")}
