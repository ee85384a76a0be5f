"""The hashes that Stable Diffusion tools use to identify a model file.

- ``sha256``: SHA-256 of the whole file; ``autov2`` is its first 10 hex digits (Civitai, A1111).
- ``tensor_sha256``: SHA-256 of the tensor data only (the bytes after the header). kohya writes
  it as ``sshs_model_hash``; A1111 calls it the "addnet" hash and shows its first 12 hex digits
  (``a1111``); Civitai calls it AutoV3. It does not change when only metadata changes.
- ``legacy``: first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (kohya's
  ``sshs_legacy_hash``, A1111's old model hash, Civitai's AutoV1).
- ``identity``: lorareg's own identity of the content as stored: the SHA-256 of the tensor index
  (every tensor's name, dtype, shape and byte range, sorted by name) and of the tensor data,
  metadata left out. Editing metadata keeps it; renaming keys (a conversion) or changing dtypes
  changes it. For an adapter made of several files (a PEFT folder),
  :func:`folder_identity` combines the files' identities.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .header import read_header
from .pages import drop_pages

if TYPE_CHECKING:
    from .header import SafetensorsHeader

_CHUNK = 8 * 1024 * 1024
LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000


@dataclass(frozen=True)
class FileHashes:
    """All identifying hashes of one safetensors file."""

    sha256: str
    tensor_sha256: str
    legacy: str
    identity: str | None = None  # of the content as stored (see the module docstring); None without a header

    @property
    def autov2(self) -> str:
        """Civitai/A1111 AutoV2: the first 10 hex digits of the file's SHA-256."""
        return self.sha256[:10]

    @property
    def autov3(self) -> str:
        """Civitai AutoV3: the SHA-256 of the tensor data (first 12 hex digits shown by Civitai)."""
        return self.tensor_sha256

    @property
    def a1111(self) -> str:
        """The short LoRA hash A1111 writes into image infotext (addnet hash, 12 hex digits)."""
        return self.tensor_sha256[:12]

    def to_dict(self) -> dict[str, str]:
        """All hashes by name, for JSON output and the catalog (``identity`` only when known)."""
        data = {"sha256": self.sha256, "tensor_sha256": self.tensor_sha256, "legacy": self.legacy}
        if self.identity is not None:
            data["identity"] = self.identity
        return {**data, "autov2": self.autov2, "autov3": self.autov3, "a1111": self.a1111}


IDENTITY_VERSION = b"lorareg-identity/1"


def index_bytes(rows: Iterable[tuple[str, str, Iterable[int], int, int]]) -> bytes:
    """The canonical bytes of a tensor index given as ``(name, dtype, shape, begin, end)`` rows."""
    ordered = [[name, dtype, list(shape), begin, end] for name, dtype, shape, begin, end in sorted(rows)]
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def tensor_index(header: SafetensorsHeader) -> bytes:
    """The canonical bytes of a file's tensor index: name, dtype, shape and byte range of every
    tensor, sorted by name (metadata and the header's own spelling left out)."""
    return index_bytes((t.name, t.dtype, tuple(t.shape), t.begin, t.end) for t in header.tensors.values())


def identity_of(index: bytes, tensor_sha256: str) -> str:
    """The identity of content with this tensor index (:func:`index_bytes`) and tensor-data SHA-256."""
    digest = hashlib.sha256(IDENTITY_VERSION + b"\n")
    digest.update(index)
    digest.update(b"\n" + tensor_sha256.encode("ascii"))
    return digest.hexdigest()


def content_identity(header: SafetensorsHeader, tensor_sha256: str) -> str:
    """The identity of a file's content as stored: SHA-256 over its tensor index and the SHA-256 of
    its tensor data. The byte ranges in the index tie every name to its bytes, so two files have the
    same identity exactly when they hold the same tensors under the same names, dtypes and shapes."""
    return identity_of(tensor_index(header), tensor_sha256)


def folder_identity(parts: Iterable[tuple[str, str]]) -> str:
    """The identity of an adapter stored as several files: ``parts`` are (path relative to the
    adapter's folder, the file's identity). One file is its own identity."""
    items = sorted(parts)
    if len(items) == 1:
        return items[0][1]
    payload = json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(IDENTITY_VERSION + b" folder\n" + payload).hexdigest()


class StreamHasher:
    """Computes :class:`FileHashes` from a file's bytes fed in order, in one pass.

    With the file's parsed ``header`` the result includes its identity (the index comes from the
    header, so no byte is read twice).
    """

    def __init__(self, data_start: int, header: SafetensorsHeader | None = None) -> None:
        self.data_start = data_start
        self.header = header
        self.position = 0
        self._whole, self._data, self._legacy = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()

    def update(self, chunk: bytes | memoryview) -> None:
        """Feed the next bytes of the file."""
        view = memoryview(chunk).cast("B")
        start, end = self.position, self.position + len(view)
        self._whole.update(view)
        if end > self.data_start:
            self._data.update(view[max(0, self.data_start - start):])
        lo, hi = max(start, LEGACY_OFFSET), min(end, LEGACY_OFFSET + LEGACY_LENGTH)
        if lo < hi:
            self._legacy.update(view[lo - start:hi - start])
        self.position = end

    def result(self) -> FileHashes:
        """The hashes of everything fed so far."""
        tensor_sha256 = self._data.hexdigest()
        identity = content_identity(self.header, tensor_sha256) if self.header is not None else None
        return FileHashes(self._whole.hexdigest(), tensor_sha256, self._legacy.hexdigest()[:8], identity)


def tensor_data_sha256(path: str | os.PathLike, data_start: int) -> str:
    """SHA-256 of a safetensors file's tensor data only (kohya's ``sshs_model_hash``).

    The file is memory-mapped and hashed in place, without copying it through read buffers.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= data_start:
            return digest.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            for start in range(data_start, size, _CHUNK):
                digest.update(view[start:start + _CHUNK])
    return digest.hexdigest()


class Deferred:
    """A value computed in a background thread (hashing releases the GIL, so it overlaps other work).

    Whoever needs the value holds the object and calls :meth:`result`; an input hash that a
    writer must put into a file's header is passed to the writer this way (see
    :func:`loralib.files.writer.write_safetensors`), so nothing depends on a shared table.
    """

    def __init__(self, fn: Callable[..., Any] | None, *args: Any) -> None:
        import threading

        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True) if fn else None
        if self._thread is not None:
            self._thread.start()

    @classmethod
    def ready(cls, value: Any) -> Deferred:
        """A deferred value that is already known."""
        deferred = cls(None)
        deferred._value = value
        return deferred

    def then(self, fn: Callable[[Any], Any]) -> Deferred:
        """A deferred value computed from this one by ``fn`` (no thread of its own; same ``done``)."""
        return _Derived(self, fn)

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread by result()
            self._error = exc

    @property
    def done(self) -> bool:
        """True once the value (or its error) is known."""
        return self._thread is None or not self._thread.is_alive()

    def result(self) -> Any:
        """Wait for the value (re-raising the background error, if any)."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class _Derived(Deferred):
    """A :class:`Deferred` whose value is a function of another one's."""

    def __init__(self, parent: Deferred, fn: Callable[[Any], Any]) -> None:
        super().__init__(None)
        self._parent, self._fn = parent, fn

    @property
    def done(self) -> bool:
        return self._parent.done

    def result(self) -> Any:
        return self._fn(self._parent.result())


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of any file's bytes (no header needed)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_file(path: str | os.PathLike, data_start: int | None = None, *,
              header: SafetensorsHeader | None = None) -> FileHashes:
    """Compute every hash of a safetensors file, identity included, in one pass over its bytes.

    ``header`` (the file's parsed header) saves reading it again; ``data_start`` alone gives the
    hashes without the identity.
    """
    path = Path(path)
    if header is None and data_start is None:
        header = read_header(path)
    if header is not None:
        data_start = header.data_start
    hasher = StreamHasher(data_start, header)
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.result()


def hash_adapter_files(headers: list[SafetensorsHeader]) -> FileHashes:
    """The hashes of an adapter's files: the first (main) file's, with the whole adapter's identity
    (:func:`folder_identity` over every file, relative to their common folder)."""
    return adapter_hashes([(Path(h.path), hash_file(h.path, header=h)) for h in headers])


def adapter_hashes(files: list[tuple[Path, FileHashes]]) -> FileHashes:
    """The hashes of an adapter made of ``files`` (path and hashes of each, the main file first):
    the main file's, with the whole adapter's identity (relative to the files' common folder)."""
    if len(files) == 1:
        return files[0][1]
    root = os.path.commonpath([str(path) for path, _ in files])
    identity = folder_identity((path.relative_to(root).as_posix(), hashes.identity) for path, hashes in files)
    main = files[0][1]
    return FileHashes(main.sha256, main.tensor_sha256, main.legacy, identity)


def hash_mapped(view: memoryview, header: SafetensorsHeader) -> FileHashes:
    """Every hash of a file whose bytes are ``view`` (a memory map), in one pass."""
    hasher = StreamHasher(header.data_start, header)
    for start in range(0, len(view), _CHUNK):
        hasher.update(view[start:start + _CHUNK])
        if isinstance(view.obj, mmap.mmap):  # keep only the chunk in use in memory
            drop_pages(view.obj, start, _CHUNK)
    return hasher.result()
