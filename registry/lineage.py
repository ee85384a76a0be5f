"""Where an adapter came from: the tree of operations (convert, resize, merge, train…) behind it.

Parents come from two places. A lorareg command that writes an adapter records its operation
(inputs with weights, parameters) when it registers the output. And loralib appends every
operation to the ``lorareg.history`` list in the file's own metadata, with each input's identity
(its content as stored) and tensor hash, so a file made elsewhere and only scanned later still
names its parents. Parents are matched by identity; inputs of older histories, which record only
the tensor hash, by tensor hash, the ambiguity between the same tensors under other key names
resolved by the recorded format and file name (:meth:`Catalog.parent_entry`). A conversion is
thus a "converted from" edge between two entries. A parent in the catalog is followed through its
own entry; one that is not is followed through the history the child file carries (its metadata
came from its first input, so the records before the last describe that input).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from loralib.errors import InvalidArgumentError, LoraError
from loralib.inspection import format_number
from loralib.metadata import history
from loralib.records import RECORD_KEYS, InputRecord, OperationRecord

from .records import ParentRecord

if TYPE_CHECKING:
    from .catalog import Catalog
    from .describe import FileFacts
    from .records import Entry

# Keys of an operation record that are not its parameters.
NOT_PARAMS = {*RECORD_KEYS, "weights"}


def history_parents(metadata: dict[str, str]) -> list[InputRecord]:
    """The inputs of the last operation in a file's ``lorareg.history`` (empty if it has none)."""
    records = history(metadata)
    last = OperationRecord.from_dict(records[-1]) if records and isinstance(records[-1], dict) else None
    return last.inputs if last is not None else []


def as_record(operation: OperationRecord | Mapping[str, Any]) -> tuple[OperationRecord, list[Any]]:
    """An operation as a typed record, and the sample images it names.

    Besides an :class:`~loralib.records.OperationRecord`, callers may pass the plain form: a
    mapping with ``"operation"``, ``"inputs"`` (input records, or paths of inputs to identify),
    an optional ``"weights"`` list, an optional ``"samples"`` list, and the parameters.
    """
    if isinstance(operation, OperationRecord):
        return operation, []
    data = dict(operation)
    samples = list(data.pop("samples", None) or [])
    weights = data.pop("weights", None)
    items = data.pop("inputs", None) or []
    record = OperationRecord.from_dict({**data, "inputs": []})
    if record is None:
        raise InvalidArgumentError("an operation record needs an \"operation\" name")
    for item in items:
        if isinstance(item, Mapping):
            record.inputs.append(InputRecord.from_dict(item))
        elif isinstance(item, (str, os.PathLike)):
            record.inputs.append(InputRecord(file=os.path.basename(os.fspath(item)), path=os.fspath(item)))
    for item, weight in zip(record.inputs, weights if isinstance(weights, (list, tuple)) else []):
        if item.weight is None and weight is not None:
            item.weight = float(weight)
    return record, samples


def _identify_input(catalog: Catalog, item: InputRecord) -> None:
    """Fill in an input's hashes and format from its path: through its catalog entry, or by
    reading it (an input that is not an adapter, a dataset folder or a base model, keeps its path)."""
    from .describe import describe
    from .paths import absolute

    if item.path is None or item.identity is not None:
        return
    path = absolute(item.path)
    item.path, item.file = str(path), item.file or path.name
    if not path.exists():
        return
    entry = catalog.by_path(path)
    if entry is not None:
        item.identity, item.tensor_sha256 = entry.identity, entry.tensor_sha256
        item.sha256, item.format = entry.sha256, item.format or entry.format
        return
    try:
        facts = describe(path, fingerprint=False)
    except LoraError:  # a dataset folder or a base model: named, not hashed
        return
    item.identity, item.tensor_sha256, item.sha256 = facts.identity, facts.tensor_sha256, facts.hashes.get("sha256")
    item.format = item.format or facts.report.format


def history_record(metadata: dict[str, str], operation: str | None) -> OperationRecord | None:
    """The last record of a file's history when it is for ``operation`` (None otherwise)."""
    records = history(metadata)
    last = OperationRecord.from_dict(records[-1]) if records and isinstance(records[-1], dict) else None
    return last if last is not None and last.operation == operation else None


def parent_records(catalog: Catalog, operation: OperationRecord, facts: FileFacts) -> list[InputRecord]:
    """The parents of a freshly written adapter, from the operation a command passed and the file's history.

    Inputs known only by path are identified through the catalog or by reading them; what the
    file's own last history record says about the same operation fills in what is still missing.
    """
    written = history_record(facts.metadata, operation.operation)
    from_file = written.inputs if written is not None else []
    if not operation.inputs:
        return from_file
    parents = []
    for i, item in enumerate(operation.completed().inputs):
        _identify_input(catalog, item)
        if i < len(from_file):
            for key in ("file", "format", "identity", "tensor_sha256", "sha256", "weight", "role"):
                if getattr(item, key) is None:
                    setattr(item, key, getattr(from_file[i], key))
        parents.append(item)
    return parents


@dataclass
class LineageNode:
    """One adapter in a lineage tree, with the operation that made it and its inputs."""

    label: str
    name: str | None = None
    identity: str | None = None
    tensor_sha256: str | None = None
    file: str | None = None
    format: str | None = None
    weight: float | None = None
    operation: str | None = None
    params: dict = field(default_factory=dict)
    in_catalog: bool = False
    from_history: bool = False
    repeated: bool = False
    parents: list[LineageNode] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready nested dictionary."""
        return asdict(self)


def _params(record: dict | None) -> dict:
    return {k: v for k, v in (record or {}).items() if k not in NOT_PARAMS}


def lineage(catalog: Catalog, entry: Entry, *, max_depth: int = 32) -> LineageNode:
    """The tree of operations and inputs behind ``entry``, as far back as anything records."""
    full = catalog.by_id(entry.id) or entry
    return _from_entry(catalog, full, None, frozenset(), max_depth)


def _from_entry(catalog: Catalog, entry: Entry, weight: float | None, seen: frozenset, depth: int) -> LineageNode:
    if not entry.metadata and entry.operation is None:
        entry = catalog.by_id(entry.id) or entry
    records = [r for r in history(entry.metadata) if isinstance(r, dict)]
    made_by = entry.operation or (records[-1] if records else None)
    node = LineageNode(label=entry.name, name=entry.name, identity=entry.identity, tensor_sha256=entry.tensor_sha256,
                       file=os.path.basename(entry.source_file) if entry.source_file else None, format=entry.format,
                       weight=weight, operation=(made_by or {}).get("operation"), params=_params(made_by),
                       in_catalog=True)
    if entry.id in seen:
        node.repeated = True
        return node
    if depth <= 0:
        return node
    carried = records[:-1] if records and made_by and records[-1].get("operation") == made_by.get("operation") else []
    for parent in catalog.parents(entry):
        node.parents.append(_from_parent(catalog, parent, carried if parent.position == 0 else [],
                                         seen | {entry.id}, depth - 1, entry.id))
    return node


def _from_parent(catalog: Catalog, parent: ParentRecord, carried: list[dict], seen: frozenset, depth: int,
                 child_id: int | None) -> LineageNode:
    found = catalog.parent_entry(parent, child_id=child_id)
    if found is not None:
        return _from_entry(catalog, found, parent.weight, seen, depth)
    label = parent.file or (parent.tensor_sha256[:12] if parent.tensor_sha256 else "unknown input")
    node = LineageNode(label=label, identity=parent.identity, tensor_sha256=parent.tensor_sha256, file=parent.file,
                       format=parent.format, weight=parent.weight)
    if not carried or depth <= 0:
        return node
    made_by = carried[-1]
    node.operation, node.params, node.from_history = made_by.get("operation"), _params(made_by), True
    inputs = (OperationRecord.from_dict(made_by) or OperationRecord("")).inputs
    for i, record in enumerate(inputs):
        grand = ParentRecord(i, record.tensor_sha256, record.sha256, record.file, record.path, record.format,
                             record.weight, identity=record.identity)
        node.parents.append(_from_parent(catalog, grand, carried[:-1] if i == 0 else [], seen, depth - 1, None))
    return node


def operation_summary(operation: str | None, params: dict) -> str:
    """One line about an operation: ``resize (rank=4)``, ``convert (diffusers → kohya)``."""
    if not operation:
        return ""
    if isinstance(params.get("params"), dict):
        params = {**{k: v for k, v in params.items() if k != "params"}, **params["params"]}
    if params.get("from_format") or params.get("to_format"):
        detail = f"{params.get('from_format') or '?'} → {params.get('to_format') or '?'}"
    else:
        scalars = [f"{k}={v}" for k, v in params.items() if isinstance(v, (str, int, float, bool)) and v not in ("", None)]
        detail = ", ".join(scalars[:4])
    return f"{operation} ({detail})" if detail else operation


def node_line(node: LineageNode) -> str:
    """The text of one node: weight, label, how it was made, and whether the catalog knows it."""
    parts = []
    if node.weight is not None:
        parts.append(f"{format_number(node.weight)} ×")
    parts.append(node.label)
    if node.operation:
        parts.append(f"← {operation_summary(node.operation, node.params)}")
    if node.tensor_sha256:
        parts.append(f"[{node.tensor_sha256[:12]}]")
    if not node.in_catalog:
        parts.append("(not in the catalog" + (", from the file's history)" if node.from_history else ")"))
    if node.repeated:
        parts.append("(shown above)")
    return " ".join(parts)


def render(node: LineageNode) -> list[str]:
    """The tree as text lines with box-drawing branches (used by the CLI and the model card)."""
    lines = [node_line(node)]
    for i, parent in enumerate(node.parents):
        last = i == len(node.parents) - 1
        sub = render(parent)
        lines.append(("└── " if last else "├── ") + sub[0])
        lines.extend(("    " if last else "│   ") + line for line in sub[1:])
    return lines
