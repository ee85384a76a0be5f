"""What the catalog returns: entries, file records and parent records, as plain dataclasses."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any

# JSON columns of the adapters table and the empty value of each.
JSON_COLUMNS = {"components": {}, "ranks": {}, "alphas": {}, "triggers": [], "user_triggers": [], "tags": [],
                "metadata": {}, "operation": None, "samples": [], "hub": [], "problems": []}
# The columns ``list`` and ``search`` read: everything but the bulky metadata and operation.
SUMMARY_COLUMNS = ("id", "name", "tensor_sha256", "sha256", "legacy", "format", "architecture", "plain_lora",
                   "components", "modules", "ranks", "alphas", "dtype", "size", "title", "description", "triggers",
                   "tags", "source", "source_repo", "source_commit", "damaged", "added_at", "updated_at")


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


def dumps(value: Any) -> str:
    """JSON as stored in the catalog (compact, unicode kept, anything unknown as a string)."""
    return _ENCODER.encode(value)


def _loads(text: str | None, empty: Any) -> Any:
    if text is None or text == "":
        return empty
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return empty


@dataclass
class Entry:
    """One adapter in the catalog. ``metadata`` and ``operation`` are empty in list/search results."""

    id: int
    name: str
    tensor_sha256: str
    sha256: str | None = None
    legacy: str | None = None
    format: str | None = None
    architecture: str | None = None
    plain_lora: bool = True
    components: dict[str, int] = field(default_factory=dict)
    modules: int | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, int] = field(default_factory=dict)
    dtype: str | None = None
    size: int | None = None
    tensors: int | None = None
    parameters: int | None = None
    title: str | None = None
    description: str | None = None
    triggers: list[str] = field(default_factory=list)
    user_triggers: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    source_repo: str | None = None
    source_revision: str | None = None
    source_commit: str | None = None
    source_file: str | None = None
    operation: dict | None = None
    samples: list[dict] = field(default_factory=list)
    hub: list[dict] = field(default_factory=list)
    damaged: bool = False
    problems: list[str] = field(default_factory=list)
    added_at: str | None = None
    updated_at: str | None = None
    identity: str | None = None
    fp_norm: float | None = None
    fp_modules: int | None = None
    fp_note: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Entry:
        """Build an entry from a row of ``adapters`` (any subset of its columns)."""
        values = {}
        for key in row.keys():  # noqa: SIM118 - iterating a sqlite3.Row yields values, not keys
            value = row[key]
            if key in JSON_COLUMNS:
                value = _loads(value, JSON_COLUMNS[key])
            elif key in ("plain_lora", "damaged"):
                value = bool(value)
            values[key] = value
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})

    @property
    def hashes(self) -> dict[str, str]:
        """Every hash by the name tools use: sha256, AutoV2, tensor sha256 (AutoV3), A1111 short hash, legacy."""
        found = {}
        if self.sha256:
            found.update(sha256=self.sha256, autov2=self.sha256[:10])
        found.update(tensor_sha256=self.tensor_sha256, autov3=self.tensor_sha256, a1111=self.tensor_sha256[:12])
        if self.legacy:
            found["legacy"] = self.legacy
        return found

    @property
    def operation_name(self) -> str | None:
        """The operation that made the adapter (``merge``, ``convert``…), when one is recorded."""
        return self.operation.get("operation") if isinstance(self.operation, dict) else None

    @property
    def rank_text(self) -> str:
        """Ranks for display: ``8`` or ``4–16``."""
        ranks = sorted(int(r) for r in self.ranks)
        if not ranks:
            return "—"
        return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"

    def to_dict(self) -> dict:
        """A JSON-ready dictionary, with the hashes spelled out."""
        data = asdict(self)
        data["hashes"] = self.hashes
        return data

    def summary(self) -> dict:
        """The fields ``list --json`` and ``search --json`` print."""
        keys = ("name", "architecture", "format", "modules", "ranks", "alphas", "dtype", "size", "title", "tags",
                "triggers", "description", "source", "source_repo", "source_commit", "damaged", "added_at",
                "updated_at")
        return {"name": self.name, **{k: getattr(self, k) for k in keys[1:]}, "hashes": self.hashes}


@dataclass
class FileRecord:
    """One path where an adapter's file was seen."""

    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    state: str
    problem: str | None = None
    seen_at: str | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)


@dataclass
class ParentRecord:
    """One input of the operation that made an adapter; ``name`` is set when it is in the catalog."""

    position: int
    tensor_sha256: str | None
    sha256: str | None
    file: str | None
    path: str | None
    format: str | None
    weight: float | None
    name: str | None = None
    identity: str | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return asdict(self)


def unique(items: list[str]) -> list[str]:
    """``items`` without repeats (case-insensitive), in their first order."""
    seen, out = set(), []
    for item in items:
        key = item.casefold()
        if item and key not in seen:
            seen.add(key)
            out.append(item)
    return out
