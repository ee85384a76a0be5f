"""Schema version 4: adapters identified by their content as stored, with a ΔW fingerprint.

Version 2 identified an adapter by its tensor-data hash alone, so a conversion that copied the
tensors bit for bit under other key names (kohya → PEFT, diffusers → PEFT) was recorded as the same
adapter as its input. Version 4 identifies it by ``identity`` (:mod:`loralib.files.hashes`: the
tensor index — names, dtypes, shapes — and the tensor data), keeps ``tensor_sha256`` as an indexed
column (AutoV3 lookups, several entries may share it), stores a fingerprint of what the adapter does
(:mod:`loralib.fingerprint`) and records each parent's identity where the history names it.

The upgrade reads headers only: a file that is unchanged since it was recorded (same size and
mtime) gets its identity from its header and the tensor hash the catalog already holds. Entries
whose files were merged by the old identity are split, one entry per identity: the entry keeps the
files of the identity of its first recorded file (the one it was created for, and named after), with
its header facts read again from that file; the other files become new entries with the same tags
and trigger words. An entry none of whose files is on disk any more gets the placeholder
identity ``tensor:<tensor_sha256>``; the first file with that tensor hash that a later ``add`` or
``scan`` records claims the entry. Fingerprints are computed by the next ``scan`` of each folder
(it re-reads the files of entries without one) — the upgrade itself never reads tensor data.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from loralib.fingerprint import BANDS

if TYPE_CHECKING:
    from sqlite_utils import Database

PLACEHOLDER_PREFIX = "tensor:"


def placeholder_identity(tensor_sha256: str) -> str:
    """The identity an entry keeps when no file of it could be read at the upgrade."""
    return PLACEHOLDER_PREFIX + tensor_sha256


def upgrade(db: Database) -> None:
    """Add the version-4 columns and indexes, and compute every entry's identity."""
    conn = db.conn
    columns = db["adapters"].columns_dict
    for name, kind in (("identity", str), ("fingerprint", bytes), ("fp_norm", float), ("fp_modules", int),
                       ("fp_note", str), *((f"fp_band{i}", int) for i in range(BANDS))):
        if name not in columns:
            db["adapters"].add_column(name, kind)
    if "identity" not in db["parents"].columns_dict:
        db["parents"].add_column("identity", str)
    for index in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'adapters' "
                              "AND sql LIKE '%UNIQUE%' AND sql LIKE '%tensor_sha256%'").fetchall():
        conn.execute(f'DROP INDEX "{index[0]}"')
    conn.execute("CREATE INDEX IF NOT EXISTS adapters_tensor_sha256 ON adapters (tensor_sha256)")
    # band keys of each fingerprint (loralib.fingerprint.band_keys): the candidates for "same adapter as"
    for i in range(BANDS):
        conn.execute(f"CREATE INDEX adapters_fp_band{i} ON adapters (fp_band{i}) WHERE fp_band{i} IS NOT NULL")
    rows = conn.execute("SELECT id, tensor_sha256 FROM adapters ORDER BY id").fetchall()
    for adapter_id, tensor_sha256 in rows:
        _identify(conn, adapter_id, tensor_sha256)
    conn.execute("CREATE UNIQUE INDEX adapters_identity ON adapters (identity)")
    conn.execute("CREATE INDEX parents_identity ON parents (identity)")


def _identify(conn: sqlite3.Connection, adapter_id: int, tensor_sha256: str) -> None:
    """Give one entry its identity from its files on disk, splitting off files of other identities."""
    files = conn.execute("SELECT path, size, mtime_ns, state FROM files WHERE adapter_id = ? ORDER BY rowid",
                         (adapter_id,)).fetchall()
    groups: dict[str, list[str]] = {}
    for path, size, mtime_ns, state in files:  # in the order they were recorded
        identity = _file_identity(Path(path), size, mtime_ns, tensor_sha256) if state == "ok" else None
        if identity is not None:
            groups.setdefault(identity, []).append(path)
    if not groups:
        conn.execute("UPDATE adapters SET identity = ? WHERE id = ?", (placeholder_identity(tensor_sha256), adapter_id))
        return
    kept, *others = groups
    conn.execute("UPDATE adapters SET identity = ? WHERE id = ?", (kept, adapter_id))
    if others:
        _refresh(conn, adapter_id, groups[kept][0])
    for identity in others:
        _split(conn, adapter_id, identity, groups[identity])


def _refresh(conn: sqlite3.Connection, adapter_id: int, path: str) -> None:
    """Read an entry's header facts again from its own file (they may have come from a merged one)."""
    from loralib.errors import LoraError

    from .describe import describe

    try:
        columns = describe(path).columns()
    except (LoraError, OSError):
        return
    conn.execute(f"UPDATE adapters SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?",
                 [*columns.values(), adapter_id])


def _file_identity(path: Path, size: int | None, mtime_ns: int | None, tensor_sha256: str) -> str | None:
    """The identity of a recorded file that is unchanged since it was recorded (None otherwise).

    A single file needs only its header (its tensor hash is the entry's); a file of a folder
    adapter (PEFT) is hashed with the folder's other files.
    """
    from loralib.errors import LoraError
    from loralib.files.hashes import content_identity
    from loralib.files.header import read_header
    from loralib.formats.layout import adapter_root

    try:
        stat = path.stat()
        if stat.st_size != size or stat.st_mtime_ns != mtime_ns:
            return None
        root = adapter_root(path)
        if root != path:
            from .describe import adapter_hashes

            return adapter_hashes(root).identity
        return content_identity(read_header(path), tensor_sha256)
    except (LoraError, OSError):
        return None


def _split(conn: sqlite3.Connection, adapter_id: int, identity: str, paths: list[str]) -> None:
    """Record the files of another identity that version 2 merged into an entry as a new entry."""
    from loralib.errors import LoraError

    from .describe import describe
    from .lineage import history_parents
    from .records import dumps, unique

    try:
        facts = describe(paths[0])
    except (LoraError, OSError):
        conn.execute(f"DELETE FROM files WHERE path IN ({', '.join('?' * len(paths))})", paths)
        return
    old = conn.execute("SELECT name, tags, user_triggers, description, added_at, updated_at FROM adapters "
                       "WHERE id = ?", (adapter_id,)).fetchone()
    name = _free_name(conn, facts.default_name())
    user_triggers = json.loads(old[2] or "[]")
    row = {**facts.columns(), "name": name, "tags": old[1] or "[]", "user_triggers": dumps(user_triggers),
           "triggers": dumps(unique(user_triggers + facts.file_triggers())),
           "description": old[3] or facts.metadata.get("modelspec.description"), "source": "file",
           "added_at": old[4], "updated_at": old[5]}
    new_id = conn.execute(f"INSERT INTO adapters ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                          list(row.values())).lastrowid
    conn.execute(f"UPDATE files SET adapter_id = ? WHERE path IN ({', '.join('?' * len(paths))})", [new_id, *paths])
    for position, parent in enumerate(history_parents(facts.metadata)):
        conn.execute("INSERT INTO parents (child_id, position, identity, tensor_sha256, sha256, file, path, format, "
                     "weight) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (new_id, position, parent.identity, parent.tensor_sha256, parent.sha256, parent.file,
                      parent.path, parent.format, parent.weight))


def _free_name(conn: sqlite3.Connection, base: str) -> str:
    candidate, n = base, 1
    while conn.execute("SELECT 1 FROM adapters WHERE name = ? COLLATE NOCASE", (candidate,)).fetchone():
        n += 1
        candidate = f"{base}-{n}"
    return candidate

