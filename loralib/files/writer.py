"""Serialise tensors to a safetensors file, hashing the bytes as they are written.

The tensor-data hash must go into the file's own metadata (``sshs_model_hash``). It does not
depend on the header, so the file is written once under a temporary name with fixed-length
placeholders in the header, the data hashed on a second thread while it is written, the header
completed in place, and the file renamed into place. Values still being computed elsewhere (an
input's hash, hashed in a background thread while it loads) are completed the same way: the
caller passes them, with the placeholder each one stands behind in the metadata. The writer
returns a :class:`WrittenFile`: the tensor hash, legacy hash and identity of what it wrote, and the
hash of the whole file (one more pass over every byte, which only the catalog needs) when first
asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dtypes import to_safetensors
from ..values import all_finite
from .atomic import atomic_file
from .hashes import LEGACY_LENGTH, LEGACY_OFFSET, Deferred, FileHashes, file_sha256, hash_file, identity_of, index_bytes

_BYTE_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without copying where possible."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(_BYTE_VIEW[t.element_size()]).numpy()).cast("B")


_PLACEHOLDER = {"tensor_sha256": "0" * 64, "tensor_sha256_0x": "0x" + "0" * 64, "legacy": "0" * 8}


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    self_hashes: Mapping[str, str] | None = None,
    pending: Mapping[str, Deferred] | None = None,
    *,
    finite: bool = False,
) -> WrittenFile:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically; return what identifies the file written.

    ``self_hashes`` maps metadata keys to hashes of the file itself that they must hold:
    ``tensor_sha256`` (kohya's ``sshs_model_hash``), ``tensor_sha256_0x`` (ModelSpec's
    ``hash_sha256``) or ``legacy`` (``sshs_legacy_hash``, computed on the final bytes at offset
    1 MiB; left out when the header itself reaches that far). ``pending`` maps placeholder strings
    that occur in metadata values to the deferred values that replace them (of the same length).

    The header is first written with placeholders of the final values' length; the data is hashed
    on a second thread while this one writes it (:class:`DataPass`); then the header is rewritten
    in place. The hash of the whole file (header included, so known only then) is left to
    :meth:`WrittenFile.hashes`.

    With ``finite``, each floating-point tensor is checked for NaN and infinity right before it is
    written: the first that fails stops the write with :class:`NonFiniteTensor`, and nothing is
    left at ``path``.
    """
    # Larger items first keeps every tensor aligned to its element size, as the safetensors library does.
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    views, entries, offset = [], {}, 0
    for name in names:
        tensor = tensors[name]
        dtype_name = to_safetensors(tensor.dtype)
        if dtype_name is None:
            raise TypeError(f"cannot store tensor {name} of dtype {tensor.dtype} in safetensors")
        view = tensor_bytes(tensor)
        entries[name] = {"dtype": dtype_name, "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + len(view)]}
        views.append(view)
        offset += len(view)
    meta = dict(metadata or {})
    self_hashes = dict(self_hashes or {})
    meta.update({key: _PLACEHOLDER[kind] for key, kind in self_hashes.items()})
    raw = _header_bytes(entries, meta)
    data_start = 8 + len(raw)
    length = struct.pack("<Q", len(raw))  # the header keeps its length when filled in
    # "r+b": the temporary file was just created empty; truncating it again ("wb") would make ext4
    # write the whole file out to disk when it is closed (its guard for files rewritten in place)
    with atomic_file(path) as tmp, open(tmp, "r+b") as f, DataPass() as data:
        f.write(length)
        f.write(raw)
        for name, view in zip(names, views):
            if finite and not all_finite(tensors[name]):
                raise NonFiniteTensor(name)
            data.add(view)
            f.write(view)
        tensor_sha256 = data.finish()
        final = raw
        if pending or self_hashes:
            meta = _fill(meta, pending or {})
            # no legacy hash when the header reaches offset 1 MiB: it would hash the header being filled in
            legacy = _legacy_hash([length + raw, *views]) if data_start <= LEGACY_OFFSET else None
            values = {"tensor_sha256": tensor_sha256, "tensor_sha256_0x": "0x" + tensor_sha256, "legacy": legacy}
            meta.update({key: values[kind] for key, kind in self_hashes.items()})
            meta = {k: v for k, v in meta.items() if v is not None}  # no legacy hash if the header covers 1 MiB
            final = _header_bytes(entries, meta)
            if len(final) > len(raw):
                raise AssertionError("a filled-in placeholder made the header longer")
            final += b" " * (len(raw) - len(final))  # trailing spaces are valid header padding
            f.seek(8)
            f.write(final)
    index = index_bytes((name, e["dtype"], e["shape"], *e["data_offsets"]) for name, e in entries.items())
    legacy = _legacy_hash([length + final, *views])
    return WrittenFile(Path(path), tensor_sha256, legacy, identity_of(index, tensor_sha256), _stamp(path))


class DataPass:
    """The SHA-256 of a file's tensor data, computed on a helper thread from the bytes handed to
    :meth:`add`, in order, while the caller writes them: hashing costs about as much as writing,
    and both release the GIL.

    :meth:`finish` waits and returns the hex digest (re-raising what failed on the helper).
    Leaving the ``with`` block stops the helper.
    """

    _DONE = object()

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="lorareg-hash", daemon=True)

    def __enter__(self) -> DataPass:
        self._thread.start()
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self._stopped = True  # the write failed: what is still queued is not worth hashing
        self._join()

    def add(self, view: memoryview) -> None:
        """Hash the next bytes."""
        self._queue.put(view)

    def finish(self) -> str:
        """The SHA-256 of every byte added (waiting for the helper)."""
        self._join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def _join(self) -> None:
        if self._thread.is_alive():
            self._queue.put(self._DONE)
            self._thread.join()

    def _run(self) -> None:
        while (view := self._queue.get()) is not self._DONE:
            if self._stopped or self._error is not None:
                continue  # only drain the queue
            try:
                self._digest.update(view)
            except BaseException as exc:  # handed to the writing thread
                self._error = exc


class NonFiniteTensor(ValueError):
    """A tensor being written holds NaN or infinite values (see :func:`write_safetensors`'s ``finite``)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"tensor {name} holds NaN or infinite values")
        self.name = name


@dataclass
class WrittenFile:
    """A safetensors file as :func:`write_safetensors` wrote it: where, and the hashes known from writing."""

    path: Path
    tensor_sha256: str
    legacy: str
    identity: str
    stamp: tuple[int, int] = field(repr=False)  # size and mtime once written: a later change means hashing again
    _hashes: FileHashes | None = field(default=None, repr=False)

    def hashes(self) -> FileHashes:
        """Every hash of the file (the whole file's SHA-256 is computed on the first call).

        If the file changed since it was written (another size or time), every hash is computed
        from what is there now."""
        if self._hashes is None:
            if _stamp(self.path) == self.stamp:
                self._hashes = FileHashes(file_sha256(self.path), self.tensor_sha256, self.legacy, self.identity)
            else:
                self._hashes = hash_file(self.path)
        return self._hashes

    def moved(self, path: Path) -> WrittenFile:
        """The same file after a rename to ``path`` (a folder's files are written under a temporary
        folder first)."""
        return WrittenFile(path, self.tensor_sha256, self.legacy, self.identity, self.stamp, self._hashes)


def _stamp(path: str | os.PathLike) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _window(chunks: list[bytes | memoryview], start: int, length: int) -> bytes:
    """The bytes ``[start, start + length)`` of the concatenation of ``chunks`` (fewer at the end)."""
    out, position = [], 0
    for chunk in chunks:
        lo, hi = max(position, start), min(position + len(chunk), start + length)
        if lo < hi:
            out.append(bytes(chunk[lo - position:hi - position]))
        position += len(chunk)
        if position >= start + length:
            break
    return b"".join(out)


def _fill(metadata: dict[str, str], pending: Mapping[str, Deferred]) -> dict[str, str]:
    """``metadata`` with every placeholder replaced by its value (waiting for it)."""
    values = {token: deferred.result() for token, deferred in pending.items()}
    filled = {}
    for key, text in metadata.items():
        for token, value in values.items():
            if token in text:
                if len(value) != len(token):
                    raise AssertionError("a deferred value differs in length from its placeholder")
                text = text.replace(token, value)
        filled[key] = text
    return filled


def _header_bytes(entries: dict, metadata: dict[str, str]) -> bytes:
    header = {"__metadata__": metadata, **entries} if metadata else entries
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8 (a file name's raw bytes): readers need valid UTF-8
        raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def _legacy_hash(chunks: list[bytes | memoryview]) -> str:
    """The legacy hash (``sshs_legacy_hash``) of the file made of ``chunks``: its 64 KiB at offset 1 MiB."""
    return hashlib.sha256(_window(chunks, LEGACY_OFFSET, LEGACY_LENGTH)).hexdigest()[:8]
