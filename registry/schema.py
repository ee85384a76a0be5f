"""The catalog's tables, and how a database file is opened, created and migrated.

Tables (schema version 4):

- ``adapters``: one row per adapter, identified by ``identity``: the SHA-256 of its content as
  stored — tensor names, dtypes, shapes and data, metadata left out (:mod:`loralib.files.hashes`)
  — so a file whose metadata alone was edited is the same adapter and a conversion to other key
  names is another. ``tensor_sha256`` (kohya's ``sshs_model_hash`` = AutoV3) is kept, indexed, for
  lookups. Header facts (format, architecture, modules, ranks, …), the ΔW fingerprint
  (:mod:`loralib.fingerprint`: ``fingerprint``, ``fp_norm``, ``fp_modules``, or ``fp_note`` saying
  why there is none), user fields (name, tags, triggers, description), provenance (source, the
  operation that made it) and timestamps.
- ``files``: every path where a file of an adapter was seen, with size and mtime (so ``scan``
  can skip unchanged files) and its own SHA-256; also files that are not adapters, so a rescan
  skips them too. ``state`` is ``ok``, ``missing``, ``changed``, ``not-lora`` or ``damaged``.
- ``parents``: the inputs of the operation that made an adapter (merge weights included),
  identified by identity (and tensor hash, which is all older histories record), so they need not
  be in the catalog.
- ``adapters_fts``: an FTS5 index over names, titles, tags, triggers, descriptions, the words of
  the metadata (``keywords``) and Hub repos, kept current by triggers; ``adapter_tags`` indexes
  the tags the same way.
- ``schema_version``: one row per migration applied.

Version 3 added indexes on ``updated_at`` and ``size`` (the ``updated`` and ``size`` sort orders).

Connections use WAL mode and a long busy timeout, and every write runs in ``BEGIN IMMEDIATE``,
so parallel ``lorareg`` processes wait for each other instead of failing with "database is locked".
Creating and migrating need sqlite-utils; opening an up-to-date catalog to read does not import it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loralib.errors import LoraError

if TYPE_CHECKING:
    from sqlite_utils import Database

SCHEMA_VERSION = 4
BUSY_TIMEOUT_S = 60.0
FTS_COLUMNS = ("name", "title", "tags", "triggers", "description", "keywords", "source_repo")
TOKENIZER = "unicode61 remove_diacritics 2"  # case- and accent-insensitive words


class CatalogError(LoraError):
    """The catalog database cannot be used (newer schema, damaged file, unwritable folder)."""


def now() -> str:
    """The current UTC time as stored in the catalog (ISO 8601, seconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the catalog at ``path``, migrated to :data:`SCHEMA_VERSION`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise CatalogError(f"cannot open the catalog at {path}: {exc}",
                           "Check that the folder is writable, or choose another with --home / LORAREG_HOME") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode, and much faster
        conn.execute("PRAGMA foreign_keys = ON")
        if schema_version(conn) != SCHEMA_VERSION:
            migrate(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise catalog_error(path, exc) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def catalog_error(path: Path, exc: sqlite3.Error) -> CatalogError:
    """What an SQLite error means for the user of the catalog at ``path``, in one line."""
    text = str(exc)
    lowered = text.lower()
    if "readonly" in lowered or "read-only" in lowered:
        return CatalogError(f"the catalog at {path} is read-only",
                            "Make it (and its folder) writable, or choose another catalog with --home / LORAREG_HOME")
    if "disk is full" in lowered or "disk i/o" in lowered:
        return CatalogError(f"the catalog at {path} could not be written: {text}",
                            "Free some space on that disk, or choose another catalog with --home / LORAREG_HOME")
    if "locked" in lowered or "busy" in lowered:
        return CatalogError(f"the catalog at {path} stayed locked by another lorareg process: {text}",
                            "Wait for the other command to finish, then try again")
    if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in lowered or "not a database" in lowered
                                                    or "corrupt" in lowered):
        return CatalogError(f"the catalog at {path} cannot be read: it is damaged ({text})",
                            "Move the file away; lorareg scan rebuilds a catalog from your folders")
    return CatalogError(f"the catalog at {path} cannot be used: {text}",
                        "If the file is damaged, move it away; lorareg scan rebuilds a catalog from your folders")


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version of an open catalog (0 for an empty database)."""
    try:
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    except sqlite3.OperationalError:  # no such table: a new database
        return 0
    return row[0] or 0


@contextmanager
def write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the write lock up front (``BEGIN IMMEDIATE``).

    A deferred transaction that reads and then writes fails at once with "database is locked"
    when another process wrote in between; taking the lock first makes it wait instead.
    Nested use joins the outer transaction.
    """
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection, migrations: dict[int, Callable[[Database], None]] | None = None) -> int:
    """Apply every pending migration, in order, in one transaction; return the new version.

    Safe when several processes open a new catalog at once: the version is read again after
    the write lock is taken, so each migration runs exactly once.
    """
    from sqlite_utils import Database

    steps = MIGRATIONS if migrations is None else migrations
    target = max(steps)
    db = Database(conn, execute_plugins=False)
    with write(conn):
        current = schema_version(conn)
        if current > target:
            raise CatalogError(f"the catalog was written by a newer lorareg (schema {current}, this one knows {target})",
                               "Upgrade lorareg, or use another catalog with --home")
        if current == 0:
            db["schema_version"].create({"version": int, "applied_at": str}, pk="version", if_not_exists=True)
        for version in sorted(v for v in steps if v > current):
            steps[version](db)
            db["schema_version"].insert({"version": version, "applied_at": now()})
    return target


def _create_v1(db: Database) -> None:
    """The first schema: adapters, files, parents, and a full-text index over the raw metadata."""
    from sqlite_utils.db import ForeignKey

    db["adapters"].create({
        "id": int, "name": str, "tensor_sha256": str, "sha256": str, "legacy": str,
        "format": str, "architecture": str, "plain_lora": int, "components": str, "modules": int,
        "ranks": str, "alphas": str, "dtype": str, "size": int, "tensors": int, "parameters": int,
        "title": str, "description": str, "triggers": str, "user_triggers": str, "tags": str,
        "metadata": str, "source": str, "source_repo": str, "source_revision": str, "source_commit": str,
        "source_file": str, "operation": str, "samples": str, "hub": str, "damaged": int, "problems": str,
        "added_at": str, "updated_at": str,
    }, pk="id", not_null=["name", "tensor_sha256", "added_at", "updated_at"],
        defaults={"tags": "[]", "triggers": "[]", "user_triggers": "[]", "samples": "[]", "hub": "[]",
                  "problems": "[]", "metadata": "{}", "damaged": 0, "source": "file"})
    db.execute("CREATE UNIQUE INDEX adapters_name ON adapters (name COLLATE NOCASE)")
    db["adapters"].create_index(["tensor_sha256"], unique=True)
    db["adapters"].create_index(["sha256"])
    db["adapters"].create_index(["architecture"])
    db["adapters"].create_index(["format"])
    db["adapters"].create_index(["added_at"])
    db["files"].create({
        "path": str, "adapter_id": int, "size": int, "mtime_ns": int, "sha256": str,
        "state": str, "problem": str, "seen_at": str,
    }, pk="path", not_null=["state"],
        foreign_keys=[ForeignKey("files", "adapter_id", "adapters", "id", on_delete="CASCADE")])
    db["files"].create_index(["adapter_id"])
    db["files"].create_index(["sha256"])
    db["parents"].create({
        "child_id": int, "position": int, "tensor_sha256": str, "sha256": str, "file": str, "path": str,
        "format": str, "weight": float,
    }, pk=("child_id", "position"),
        foreign_keys=[ForeignKey("parents", "child_id", "adapters", "id", on_delete="CASCADE")])
    db["parents"].create_index(["tensor_sha256"])
    db["adapters"].enable_fts(["name", "title", "tags", "triggers", "description", "metadata", "source_repo"],
                              create_triggers=True, tokenize=TOKENIZER)


def _keywords_and_tag_index(db: Database) -> None:
    """Version 2: index the metadata's words (``keywords``) instead of its raw JSON, and the tags.

    Raw metadata (bucket tables, hashes, numbers, thumbnails) made the index several times larger
    and ranking broad searches slow; the tag table makes ``--tag`` an index lookup.
    """
    import json

    from sqlite_utils.db import ForeignKey

    from .describe import metadata_keywords

    if "keywords" not in db["adapters"].columns_dict:
        db["adapters"].add_column("keywords", str)
    for adapter_id, metadata in db.execute("SELECT id, metadata FROM adapters").fetchall():
        try:
            words = metadata_keywords(json.loads(metadata or "{}"))
        except (json.JSONDecodeError, AttributeError):
            words = ""
        db.execute("UPDATE adapters SET keywords = ? WHERE id = ?", (words, adapter_id))
    db["adapters"].disable_fts()
    db["adapters"].enable_fts(list(FTS_COLUMNS), create_triggers=True, tokenize=TOKENIZER)
    # Tags live in adapters.tags (a JSON list); this derived table, kept by triggers, indexes them.
    db["adapter_tags"].create({"tag": str, "adapter_id": int}, pk=("tag", "adapter_id"), if_not_exists=True,
                              foreign_keys=[ForeignKey("adapter_tags", "adapter_id", "adapters", "id",
                                                       on_delete="CASCADE")])
    db.executescript("""
        CREATE TRIGGER IF NOT EXISTS adapter_tags_ai AFTER INSERT ON adapters BEGIN
          INSERT OR IGNORE INTO adapter_tags (tag, adapter_id) SELECT value, new.id FROM json_each(new.tags);
        END;
        CREATE TRIGGER IF NOT EXISTS adapter_tags_au AFTER UPDATE OF tags ON adapters BEGIN
          DELETE FROM adapter_tags WHERE adapter_id = old.id;
          INSERT OR IGNORE INTO adapter_tags (tag, adapter_id) SELECT value, new.id FROM json_each(new.tags);
        END;
        INSERT OR IGNORE INTO adapter_tags (tag, adapter_id) SELECT j.value, a.id FROM adapters a, json_each(a.tags) j;
    """)


def _sort_indexes(db: Database) -> None:
    """Version 3: indexes for the ``updated`` and ``size`` sort orders, so a page of a large catalog
    sorted by them reads a few rows instead of all of them."""
    db["adapters"].create_index(["updated_at"], if_not_exists=True)
    db["adapters"].create_index(["size"], if_not_exists=True)


def _identity_and_fingerprint(db: Database) -> None:
    """Version 4: identity of the content as stored, ΔW fingerprints, parents by identity (see
    :mod:`lorareg.registry.upgrade_v4`)."""
    from .upgrade_v4 import upgrade

    upgrade(db)


MIGRATIONS: dict[int, Callable[[Database], None]] = {1: _create_v1, 2: _keywords_and_tag_index, 3: _sort_indexes,
                                                     4: _identity_and_fingerprint}
