"""Read and validate a safetensors header without loading any tensor.

The format: 8 bytes little-endian header length ``N``, ``N`` bytes of UTF-8 JSON, then the tensor
data. Each JSON entry gives a tensor's dtype, shape and byte range in the data section; the
optional ``__metadata__`` entry maps strings to strings. Everything here is checked before it is
trusted, so a damaged or hostile header becomes a :class:`~loralib.errors.CorruptFileError`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import operator
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import CorruptFileError, InputNotFoundError
from ..jsontext import DuplicateKeyError, JSONTextError, loads
from ..units import human_size
from . import file_kind, require_regular_file

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
# No file is this large; bounding offsets and dimensions by it keeps every size, count and sum
# of a header exact in 64-bit integers (and cheap to compute), whatever the header claims.
MAX_OFFSET = 2 ** 60
MAX_DIMS = 32
READ_AT_ONCE = 256 * 1024  # files up to this size are read whole with their header: one read serves all

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "F64": 64, "I64": 64, "U64": 64, "C64": 64,
}
DTYPE_SIZES: dict[str, float] = {name: bits / 8 for name, bits in DTYPE_BITS.items()}


class TensorInfo(NamedTuple):
    """Where one tensor lives in a safetensors file (a tuple: headers list hundreds of thousands)."""

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
    # The whole file as read with the header, for small files (<= READ_AT_ONCE); None otherwise.
    content: bytes | None = field(default=None, repr=False, compare=False)

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
    def trailing_bytes(self) -> int:
        """How many bytes follow the tensor data (0 for a well-formed file)."""
        return max(0, self.file_size - self.data_start - self.data_size)

    @property
    def is_truncated(self) -> bool:
        """True when the file ends before the tensor data the header describes."""
        return self.missing_bytes > 0

    @property
    def problem(self) -> str | None:
        """What is wrong with a file whose header is valid: missing tensor data, or bytes after it."""
        if self.is_truncated:
            return (f"{self.path.name} is truncated: its header lists {len(self.tensors)} tensors "
                    f"({human_size(self.data_size)}) but {human_size(self.missing_bytes)} of tensor data are missing")
        if self.trailing_bytes:
            return (f"{self.path.name} has {human_size(self.trailing_bytes)} after its tensor data, which safetensors "
                    "readers refuse")
        return None

    def require_complete(self) -> None:
        """Raise :class:`CorruptFileError` if tensor data is missing or followed by other bytes."""
        problem = self.problem
        if problem is not None:
            hint = "Download or copy the file again" if self.is_truncated else "The file is damaged; download it again"
            raise CorruptFileError(problem, hint)

    def read_scalars(self, names: list[str]) -> dict[str, float]:
        """Read one-element tensors (such as kohya ``alpha`` values) straight from the file."""
        values = {}
        with contextlib.nullcontext() if self.content is not None else open(self.path, "rb") as f:
            for name in names:
                info = self.tensors[name]
                if info.numel != 1:
                    raise CorruptFileError(
                        f"{self.path.name}: tensor {name} should hold one value, it has shape {list(info.shape)}")
                start = self.data_start + info.begin
                if f is None:
                    raw = self.content[start:start + info.nbytes]
                else:
                    f.seek(start)
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


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Raises :class:`InputNotFoundError` for a missing path and :class:`CorruptFileError` for
    anything that is not a well-formed safetensors header (a FIFO, socket or device is refused
    before it is opened). A file whose tensor data is cut off, or followed by other bytes, is
    returned with :attr:`SafetensorsHeader.problem` set, so it can still be described.
    """
    path = path if isinstance(path, Path) else Path(path)
    name = path.name
    if file_kind(path) is not None:  # one stat for a regular file; the checks below say what else it is
        if not path.exists():
            raise InputNotFoundError(f"{path} does not exist", "Check the path")
        if path.is_dir():
            raise CorruptFileError(f"{path} is a folder, not a safetensors file")
        require_regular_file(path, "safetensors file")
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        content = f.read() if file_size <= READ_AT_ONCE else None
        if content is not None and len(content) != file_size:  # changed while being read: read it in parts
            content = None
            f.seek(0)
        prefix = content[:8] if content is not None else f.read(8)
        if len(prefix) < 8:
            what = "empty" if file_size == 0 else f"only {file_size} bytes long"
            raise CorruptFileError(f"{name} is {what}, not a safetensors file")
        (header_size,) = struct.unpack("<Q", prefix)
        kind = _pickle_kind(prefix)
        if kind is not None:
            # a header of 640, 896, 1152 or 1408 bytes starts with a pickle's two bytes too: its JSON tells them apart
            opening = content[8:9] if content is not None else f.read(1)
            if content is None:
                f.seek(8)
            if header_size <= file_size - 8 and opening == b"{":
                kind = None
        if kind is not None:
            raise CorruptFileError(
                f"{name} is a PyTorch pickle file ({kind}), not a safetensors file, whatever its name says",
                "Rename it to .ckpt; reading it would run code stored in it, so only convert it "
                "(with --allow-pickle) if you trust its source")
        if header_size > MAX_HEADER_BYTES:
            raise CorruptFileError(
                f"{name} is not a valid safetensors file: it declares a {human_size(header_size)} header "
                f"(the limit is {human_size(MAX_HEADER_BYTES)})",
                "It is damaged, or not a safetensors file at all",
            )
        if header_size > file_size - 8:
            raise CorruptFileError(
                f"{name} is not a valid safetensors file: it declares a {human_size(header_size)} header "
                f"but the whole file is {human_size(file_size)}",
                "It is truncated, or not a safetensors file at all",
            )
        raw = content[8:8 + header_size] if content is not None else f.read(header_size)
    try:
        parsed = _parse_json(raw)
    except DuplicateKeyError as exc:
        raise CorruptFileError(f"{name} has a malformed header: {exc}",
                               "Readers disagree on which entry counts; the file is damaged or crafted") from exc
    except JSONTextError as exc:
        raise CorruptFileError(
            f"{name} is not a safetensors file: its header is not valid JSON ({exc})",
            "It may be a pickle checkpoint (.ckpt/.pt) renamed, or damaged",
        ) from exc
    del raw
    if not isinstance(parsed, dict):
        raise CorruptFileError(f"{name} is not a safetensors file: its header is not a JSON object")
    metadata = _parse_metadata(parsed.pop("__metadata__", None), name)
    tensors = _parse_tensors(parsed, name)
    del parsed
    _check_layout(tensors, name)
    return SafetensorsHeader(path, header_size, file_size, tensors, metadata, content)


def _pickle_kind(prefix: bytes) -> str | None:
    """What a file starting with ``prefix`` is when it is a PyTorch file: torch.save's zip archive, or a bare pickle."""
    if prefix.startswith(b"PK\x03\x04"):
        return "a zip archive, as torch.save writes"
    if prefix[0] == 0x80 and 2 <= prefix[1] <= 5:
        return f"a pickle, protocol {prefix[1]}"
    return None


def _parse_json(raw: bytes):
    """The header's JSON, refusing a key written twice (readers would disagree on which counts).

    Checking every object for repeated keys costs half again the parse; instead the parse is
    plain, and the keys of a header without escape sequences are counted in the raw bytes: when
    every field occurs as often as there are tensors, no key can be repeated. Otherwise (or with
    escapes, which can spell one key two ways) the header is parsed again with the exact check.
    """
    # A large header is thousands of small objects; the garbage collector would rescan every live
    # object of the program several times while they are created, for nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        if b"\\u" in raw:
            return loads(raw, unique_keys=True)
        parsed = loads(raw)
        if isinstance(parsed, dict) and not _each_key_once(raw, parsed):
            parsed = loads(raw, unique_keys=True)  # names the repeated key, or finds none
        return parsed
    finally:
        if collecting:
            gc.enable()


def _each_key_once(raw: bytes, parsed: dict) -> bool:
    """True when the raw header can hold no repeated key: ``__metadata__`` occurs as often as it
    was parsed, and each entry field as often as there are entries (a quoted word inside a
    string is escaped, so every occurrence counted is a real key or value)."""
    has_metadata = "__metadata__" in parsed
    entries = len(parsed) - has_metadata
    if raw.count(b'"__metadata__"') != has_metadata:
        return False
    return all(raw.count(field) == entries for field in (b'"dtype"', b'"shape"', b'"data_offsets"'))


def _parse_metadata(value: object, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CorruptFileError(f"{name} has malformed metadata: __metadata__ must map strings to strings")
    return value


def _parse_tensors(parsed: dict, name: str) -> dict[str, TensorInfo]:
    """Every entry checked and turned into a :class:`TensorInfo`, at a few hundred nanoseconds each."""
    bits_of = DTYPE_BITS
    tensors: dict[str, TensorInfo] = {}
    collecting = gc.isenabled()
    gc.disable()
    try:
        for key, entry in parsed.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise _malformed(key, entry, name) from None
            bits = bits_of.get(dtype) if type(dtype) is str else None
            if bits is None:
                raise CorruptFileError(f"{_bad(key, name)}: unknown dtype {str(dtype)[:40]!r}")
            if type(shape) is not list:
                raise CorruptFileError(f"{_bad(key, name)}: shape must be a list of non-negative integers")
            if len(shape) > MAX_DIMS:
                raise CorruptFileError(f"{_bad(key, name)}: its shape has {len(shape)} dimensions (at most {MAX_DIMS})")
            numel = 1
            for size in shape:
                if type(size) is not int or not 0 <= size <= MAX_OFFSET:
                    raise CorruptFileError(f"{_bad(key, name)}: shape must be a list of non-negative integers "
                                           f"below 2^60")
                numel *= size  # at most MAX_DIMS factors below 2^60: a bounded integer
            if type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= MAX_OFFSET:
                raise CorruptFileError(f"{_bad(key, name)}: data_offsets must be two increasing non-negative "
                                       f"integers below 2^60")
            if numel * bits != (end - begin) * 8:
                needed = numel * bits / 8
                raise CorruptFileError(f"{_bad(key, name)}: shape {shape[:8]} of {dtype} needs {needed:g} bytes but "
                                       f"its offsets span {end - begin}")
            tensors[key] = TensorInfo(key, dtype, tuple(shape), begin, end)
    finally:
        if collecting:
            gc.enable()
    return tensors


def _bad(key: str, name: str) -> str:
    return f"{name} has a malformed header entry for tensor {key[:200]!r}"


def _malformed(key: str, entry: object, name: str) -> CorruptFileError:
    if not isinstance(entry, dict):
        return CorruptFileError(_bad(key, name))
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        return CorruptFileError(f"{_bad(key, name)}: it has no {missing[0]}")
    return CorruptFileError(f"{_bad(key, name)}: data_offsets must be two increasing non-negative integers")


def _check_layout(tensors: dict[str, TensorInfo], name: str) -> None:
    """Tensors must tile the data section from offset 0 without gaps or overlaps."""
    position = 0
    for info in sorted(tensors.values(), key=operator.itemgetter(3, 4)):  # (begin, end)
        if info.begin != position:
            problem = "overlaps another tensor" if info.begin < position else "leaves a gap before it"
            raise CorruptFileError(f"{name} has a malformed header: tensor {info.name[:200]!r} {problem}")
        position = info.end
