"""The hashes that Stable Diffusion tools use to identify a model file.

- ``sha256``: SHA-256 of the whole file; ``autov2`` is its first 10 hex digits (Civitai, A1111).
- ``tensor_sha256``: SHA-256 of the tensor data only (the bytes after the header). kohya writes
  it as ``sshs_model_hash``; A1111 calls it the "addnet" hash and shows its first 12 hex digits
  (``a1111``); Civitai calls it AutoV3. It does not change when only metadata changes.
- ``legacy``: first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (kohya's
  ``sshs_legacy_hash``, A1111's old model hash, Civitai's AutoV1).
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .header import read_header

_CHUNK = 8 * 1024 * 1024
LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000


@dataclass(frozen=True)
class FileHashes:
    """All identifying hashes of one safetensors file."""

    sha256: str
    tensor_sha256: str
    legacy: str

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
        """All hashes by name, for JSON output and the catalog."""
        return {**asdict(self), "autov2": self.autov2, "autov3": self.autov3, "a1111": self.a1111}


class StreamHasher:
    """Computes :class:`FileHashes` from a file's bytes fed in order, in one pass."""

    def __init__(self, data_start: int) -> None:
        self.data_start = data_start
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
        return FileHashes(self._whole.hexdigest(), self._data.hexdigest(), self._legacy.hexdigest()[:8])


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


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a whole file of any kind (for files that need not be safetensors)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_file(path: str | os.PathLike, data_start: int | None = None) -> FileHashes:
    """Compute every hash of a safetensors file in one pass over its bytes."""
    path = Path(path)
    if data_start is None:
        data_start = read_header(path).data_start
    hasher = StreamHasher(data_start)
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.result()
