"""The record of an operation: what made an adapter, from which inputs, with which parameters.

One :class:`OperationRecord` travels from the operation that computes an adapter (convert, merge,
resize, extract, bake, train) to the writer, which appends it to the file's ``lorareg.history``
metadata, and on to the catalog, which records the inputs as the adapter's parents.

An input is identified by its ``identity`` (the SHA-256 of its content as stored, see
:mod:`loralib.files.hashes`; what the catalog matches parents by), its tensor-data hash
``tensor_sha256`` (AutoV3, what older files recorded) and its file's ``sha256``. These are often
still being computed (in a background thread, while the input loads) when the record is made. The
record then holds the :class:`~loralib.files.hashes.Deferred` itself (``pending_hashes``);
:meth:`OperationRecord.history_entry` stands placeholders of the same length in for the values and
hands them to the writer with the deferred values they stand for, so the writer completes the header
once the hashes are known. Nothing is looked up in a shared table: the writer holds what it fills in.

On disk a record is a flat JSON object, as earlier versions wrote it: ``operation``, ``inputs``,
the parameters at the top level, and what the writer adds (``tool``, ``date``, ``ranks``,
``alphas``). Records read from files are untrusted: :meth:`OperationRecord.from_dict` keeps only
values of the expected types.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .files.hashes import Deferred

# Keys of a stored record that are not parameters of the operation.
RECORD_KEYS = ("operation", "inputs", "tool", "date", "ranks", "alphas")
INPUT_KEYS = ("file", "path", "format", "identity", "tensor_sha256", "sha256", "weight", "role")
# The hashes a pending input fills in, each a 64-digit hex string.
PENDING_KEYS = ("identity", "tensor_sha256", "sha256")


@dataclass
class InputRecord:
    """One input of an operation: how it is named and identified, and its weight in a merge.

    ``path`` is where the input lay on this machine: the catalog keeps it, files never carry it.
    ``role`` tells inputs apart that are not adapters (``base`` and ``tuned`` of an extraction);
    ``extra`` holds any other plain values a caller recorded (a dataset's image count, say).
    ``pending_hashes`` is a :class:`~loralib.files.hashes.Deferred`
    :class:`~loralib.files.hashes.FileHashes` of the input, still being computed.
    """

    file: str | None = None
    format: str | None = None
    tensor_sha256: str | None = None
    sha256: str | None = None
    path: str | None = None
    weight: float | None = None
    role: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    identity: str | None = None
    pending_hashes: Deferred | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputRecord:
        """An input read from a file's history or a catalog row (wrong types are dropped)."""
        text = {k: str(data[k]) for k in ("file", "format", "identity", "tensor_sha256", "sha256", "role")
                if isinstance(data.get(k), (str, int)) and not isinstance(data.get(k), bool)}
        path = data.get("path")
        weight = data.get("weight")
        extra = {str(k): v for k, v in data.items() if k not in INPUT_KEYS and _plain(v)}
        return cls(**text, path=os.fspath(path) if isinstance(path, (str, os.PathLike)) else None,
                   weight=float(weight) if _finite_number(weight) else None, extra=extra)

    def resolve(self) -> InputRecord:
        """Fill in the hashes still being computed (waiting for them); returns the record itself."""
        if self.pending_hashes is not None:
            hashes = self.pending_hashes.result()
            for key in PENDING_KEYS:
                if getattr(self, key) is None:
                    setattr(self, key, getattr(hashes, key, None))
            self.pending_hashes = None
        return self

    def to_dict(self, *, with_path: bool = True) -> dict[str, Any]:
        """The stored form: only the fields that are set (``path`` left out for files)."""
        self.resolve()
        data = {k: getattr(self, k) for k in INPUT_KEYS if getattr(self, k) is not None}
        if not with_path:
            data.pop("path", None)
        return {**data, **{k: v for k, v in self.extra.items() if k not in data}}


@dataclass
class OperationRecord:
    """An operation, its inputs (in order) and its parameters."""

    operation: str
    inputs: list[InputRecord] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    written: dict[str, Any] = field(default_factory=dict)  # tool, date, ranks, alphas: set by the writer

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OperationRecord | None:
        """A record read from a file's history or the catalog; None when it is not one."""
        if not isinstance(data, Mapping) or not isinstance(data.get("operation"), str):
            return None
        inputs = data.get("inputs")
        records = [InputRecord.from_dict(i) for i in inputs if isinstance(i, Mapping)] if isinstance(inputs, list) else []
        params = {k: v for k, v in data.items() if k not in RECORD_KEYS}
        written = {k: data[k] for k in RECORD_KEYS[2:] if k in data}
        return cls(data["operation"], records, params, written)

    def to_dict(self, *, with_paths: bool = True) -> dict[str, Any]:
        """The flat stored form (pending hashes are waited for)."""
        return {"operation": self.operation, **self.params,
                "inputs": [i.to_dict(with_path=with_paths) for i in self.inputs], **self.written}

    def history_entry(self, written: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Deferred]]:
        """The entry a writer appends to a file's history, without waiting for pending hashes.

        Returns the entry (with ``written`` added, input paths left out) and the placeholders
        that stand in it for hashes still being computed, each with the value it stands for.
        """
        pending: dict[str, Deferred] = {}
        inputs = []
        for item in self.inputs:
            if item.pending_hashes is not None and item.pending_hashes.done:
                item.resolve()
            data = {k: getattr(item, k) for k in INPUT_KEYS if k != "path" and getattr(item, k) is not None}
            if item.pending_hashes is not None:
                for key in PENDING_KEYS:
                    if key not in data:
                        token = secrets.token_hex(32)  # a SHA-256 hex digest's length
                        pending[token] = item.pending_hashes.then(_attribute(key))
                        data[key] = token
            inputs.append({**{k: data[k] for k in INPUT_KEYS if k in data},
                           **{k: v for k, v in item.extra.items() if k not in INPUT_KEYS}})
        entry = {"operation": self.operation, **self.params, "inputs": inputs, **written}
        return entry, pending

    def completed(self, written: Mapping[str, Any] | None = None) -> OperationRecord:
        """A copy with every pending hash resolved and ``written`` recorded."""
        inputs = [replace(i).resolve() for i in self.inputs]
        return replace(self, inputs=inputs, written={**self.written, **(written or {})})

    @property
    def weights(self) -> list[float | None]:
        """The inputs' weights, in order."""
        return [i.weight for i in self.inputs]


def _attribute(name: str):
    """A function reading one hash of a :class:`~loralib.files.hashes.FileHashes` (for a placeholder)."""
    def read(hashes: Any) -> str:
        value = getattr(hashes, name, None)
        if not isinstance(value, str) or len(value) != 64:
            raise ValueError(f"the input's {name} could not be computed")
        return value
    return read


def _plain(value: Any) -> bool:
    """True for a JSON value worth keeping as it is: text, a finite number, a truth value, null."""
    return value is None or isinstance(value, (str, bool)) or _finite_number(value)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
