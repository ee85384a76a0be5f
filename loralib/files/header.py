"""Read and validate a safetensors header without loading any tensor.

The format: 8 bytes little-endian header length ``N``, ``N`` bytes of UTF-8 JSON, then the tensor
data. Each JSON entry gives a tensor's dtype, shape and byte range in the data section; the
optional ``__metadata__`` entry maps strings to strings. Everything here is checked before it is
trusted, so a damaged or hostile header becomes a :class:`~loralib.errors.CorruptFileError`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CorruptFileError, InputNotFoundError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces

DTYPE_SIZES: dict[str, float] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 0.5, "F6_E2M3": 0.75,
    "F6_E3M2": 0.75, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "F64": 8, "I64": 8, "U64": 8, "C64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin


@dataclass
class SafetensorsHeader:
    """A validated safetensors header: the tensors it lists, its metadata, and the file's size."""

    path: Path
    header_size: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        """Byte offset of the tensor data in the file."""
        return 8 + self.header_size

    @property
    def data_size(self) -> int:
        """Bytes the header says the tensor data occupies."""
        return max((t.end for t in self.tensors.values()), default=0)

    @property
    def missing_bytes(self) -> int:
        """How many bytes of tensor data are missing from the file (0 for a whole file)."""
        return max(0, self.data_start + self.data_size - self.file_size)

    @property
    def is_truncated(self) -> bool:
        """True when the file ends before the tensor data the header describes."""
        return self.missing_bytes > 0

    def require_complete(self) -> None:
        """Raise :class:`CorruptFileError` if tensor data is missing."""
        if self.is_truncated:
            raise CorruptFileError(
                f"{self.path.name} is truncated: its header lists {len(self.tensors)} tensors "
                f"({_size(self.data_size)}) but {_size(self.missing_bytes)} of tensor data are missing",
                "Download or copy the file again",
            )

    def read_scalars(self, names: list[str]) -> dict[str, float]:
        """Read one-element tensors (such as kohya ``alpha`` values) straight from the file."""
        values = {}
        with open(self.path, "rb") as f:
            for name in names:
                info = self.tensors[name]
                if info.numel != 1:
                    raise CorruptFileError(
                        f"{self.path.name}: tensor {name} should hold one value, it has shape {list(info.shape)}")
                f.seek(self.data_start + info.begin)
                raw = f.read(info.nbytes)
                if len(raw) != info.nbytes:
                    self.require_complete()
                values[name] = decode_scalar(info.dtype, raw, f"{self.path.name}: tensor {name}")
        return values


_SCALAR_FORMATS = {"F16": "<e", "F32": "<f", "F64": "<d", "I8": "<b", "U8": "<B", "I16": "<h", "U16": "<H",
                   "I32": "<i", "U32": "<I", "I64": "<q", "U64": "<Q", "BOOL": "<?"}


def decode_scalar(dtype: str, raw: bytes, what: str) -> float:
    """Decode the bytes of a single value stored with safetensors dtype ``dtype``."""
    if dtype == "BF16":
        return struct.unpack("<f", b"\x00\x00" + raw)[0]
    fmt = _SCALAR_FORMATS.get(dtype)
    if fmt is None:
        raise CorruptFileError(f"{what} has dtype {dtype}, which cannot hold a scale factor")
    return float(struct.unpack(fmt, raw)[0])


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Raises :class:`InputNotFoundError` for a missing path and :class:`CorruptFileError` for
    anything that is not a well-formed safetensors header. A file whose tensor data is cut off
    is returned with :attr:`SafetensorsHeader.is_truncated` set, so it can still be described.
    """
    path = Path(path)
    name = path.name
    if not path.exists():
        raise InputNotFoundError(f"{path} does not exist", "Check the path")
    if path.is_dir():
        raise CorruptFileError(f"{path} is a folder, not a safetensors file")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            what = "empty" if file_size == 0 else f"only {file_size} bytes long"
            raise CorruptFileError(f"{name} is {what}, not a safetensors file")
        (header_size,) = struct.unpack("<Q", prefix)
        kind = _pickle_kind(prefix)
        if kind is not None:
            raise CorruptFileError(
                f"{name} is a PyTorch pickle file ({kind}), not a safetensors file, whatever its name says",
                "Rename it to .ckpt; reading it would run code stored in it, so only convert it "
                "(with --allow-pickle) if you trust its source")
        if header_size > MAX_HEADER_BYTES:
            raise CorruptFileError(
                f"{name} is not a valid safetensors file: it declares a {_size(header_size)} header "
                f"(the limit is {_size(MAX_HEADER_BYTES)})",
                "It is damaged, or not a safetensors file at all",
            )
        if header_size > file_size - 8:
            raise CorruptFileError(
                f"{name} is not a valid safetensors file: it declares a {_size(header_size)} header "
                f"but the whole file is {_size(file_size)}",
                "It is truncated, or not a safetensors file at all",
            )
        raw = f.read(header_size)
    try:
        parsed = _parse_json(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(
            f"{name} is not a safetensors file: its header is not valid JSON",
            "It may be a pickle checkpoint (.ckpt/.pt) renamed, or damaged",
        ) from exc
    if not isinstance(parsed, dict):
        raise CorruptFileError(f"{name} is not a safetensors file: its header is not a JSON object")
    metadata = _parse_metadata(parsed.pop("__metadata__", None), name)
    tensors = {key: _parse_tensor(key, entry, name) for key, entry in parsed.items()}
    _check_layout(tensors, name)
    return SafetensorsHeader(path, header_size, file_size, tensors, metadata)


def _pickle_kind(prefix: bytes) -> str | None:
    """What a file starting with ``prefix`` is when it is a PyTorch file: torch.save's zip archive, or a bare pickle."""
    if prefix.startswith(b"PK\x03\x04"):
        return "a zip archive, as torch.save writes"
    if prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return f"a pickle, protocol {prefix[1]}"
    return None


def _parse_json(raw: bytes):
    # A large header is thousands of small objects; the garbage collector would rescan every live
    # object of the program several times while they are created, for nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return json.loads(raw.decode("utf-8"))
    finally:
        if collecting:
            gc.enable()


def _parse_metadata(value: object, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CorruptFileError(f"{name} has malformed metadata: __metadata__ must map strings to strings")
    return dict(value)


def _parse_tensor(key: str, entry: object, name: str) -> TensorInfo:
    bad = f"{name} has a malformed header entry for tensor {key!r}"
    if not isinstance(entry, dict):
        raise CorruptFileError(bad)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CorruptFileError(f"{bad}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CorruptFileError(f"{bad}: shape must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise CorruptFileError(f"{bad}: data_offsets must be two increasing non-negative integers")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CorruptFileError(
            f"{bad}: shape {shape} of {dtype} needs {expected:g} bytes but its offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(key, dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(tensors: dict[str, TensorInfo], name: str) -> None:
    """Tensors must tile the data section from offset 0 without gaps or overlaps."""
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            problem = "overlaps another tensor" if info.begin < position else "leaves a gap before it"
            raise CorruptFileError(f"{name} has a malformed header: tensor {info.name!r} {problem}")
        position = info.end
