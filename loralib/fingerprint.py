"""A fingerprint of what an adapter does — its ΔW — whatever its format, key spelling, dtype or factors.

Every module's ``ΔW = scale · up @ down`` is sketched without forming it: fixed, seeded ±1 probe
matrices ``P`` (input side) and ``Q`` (output side), chosen by the layer's width alone, give the
``PROBES × PROBES`` numbers ``Qᵀ ΔW P = scale · (Qᵀ up)(down P)``, which cost ``O(rank · width)``.
For any two matrices, the mean product of their sketches is their Frobenius inner product, so
the sketch keeps what matters: how much two ΔW point the same way, and how large they are. The
numbers of all modules are then hashed (by module key, with a random sign) into one vector of
:data:`DIMENSIONS` floats, the fingerprint. The cosine of two fingerprints estimates the cosine of
the two adapters' whole ΔW (modules one of them lacks count as zero); the length estimates
``‖ΔW‖`` (Frobenius, over all modules).

What stays equal: a conversion to another format or key spelling (module keys are read into the
one internal spelling), another dtype (the difference is rounding), other factors of the same ΔW
(a CP ``mid`` folded into ``down``, factors rescaled against alpha). What does not: a rank
reduction (its ΔW is an approximation: similar, not equal) or another adapter (its cosine is about
0, within ``±1/√DIMENSIONS``).

Only plain LoRA factors are fingerprinted (LyCORIS and other families are skipped with the reason);
factors are read as numpy arrays straight from the safetensors bytes (F32, F16, BF16, F64). No
torch. Comparing two fingerprints needs neither torch nor numpy (:func:`compare`).
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from .formats.base import AdapterIndex, ModuleEntry
    from .formats.source import TensorSource

DIMENSIONS = 256  # floats in a fingerprint
PROBES = 4  # probe vectors per side and module: PROBES² numbers per module
VERSION = 1
MAGIC = b"LFP" + bytes([VERSION])
# Verdicts of :func:`compare`. Rounding to fp16/bf16 moves the cosine by about 1e-6 and the
# length by about 1e-4; a rank reduction keeping 99.99 % of the energy moves the cosine by 5e-5.
SAME_COSINE = 0.9999
SAME_NORM_RATIO = 0.01
NEAR_COSINE = 0.8

# Reader: (source, tensor name) -> the tensor's raw bytes.
RawReader = Callable[["TensorSource", str], bytes]


@dataclass
class Fingerprint:
    """A fingerprint vector, how many modules went into it, and what was left out (with why)."""

    vector: Any  # numpy float32 [DIMENSIONS]
    modules: int
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def norm(self) -> float:
        """The estimated Frobenius norm of the whole ΔW."""
        return math.sqrt(float(self.vector.astype("float64") @ self.vector.astype("float64"))) / PROBES

    def to_bytes(self) -> bytes:
        """The stored form: a 4-byte tag, then the floats (little-endian float32)."""
        return MAGIC + self.vector.astype("<f4").tobytes()

    def bands(self) -> list[int]:
        """The band keys of :func:`band_keys`, computed with numpy."""
        import numpy as np

        bits = (self.vector[:BANDS * BAND_BITS] >= 0).reshape(BANDS, BAND_BITS).astype(np.int64)
        return (bits @ (1 << np.arange(BAND_BITS, dtype=np.int64))).tolist()


@dataclass(frozen=True)
class Comparison:
    """How two fingerprints compare: cosine of the ΔW, ratio of their norms, and the verdict."""

    similarity: float
    norm_ratio: float
    verdict: str  # "same", "near" or "different"


def floats(blob: bytes | None) -> list[float] | None:
    """The vector of a stored fingerprint (None for anything that is not one of this version)."""
    if not blob or len(blob) != len(MAGIC) + 4 * DIMENSIONS or not blob.startswith(MAGIC):
        return None
    values = array("f", blob[len(MAGIC):])
    if sys.byteorder != "little":
        values.byteswap()
    return values.tolist()


def compare(a: bytes | list[float], b: bytes | list[float], *, near: float = NEAR_COSINE) -> Comparison | None:
    """Compare two stored fingerprints (None when either is missing or empty). Pure Python."""
    x = floats(a) if isinstance(a, (bytes, bytearray, memoryview)) else a
    y = floats(b) if isinstance(b, (bytes, bytearray, memoryview)) else b
    if x is None or y is None:
        return None
    nx, ny = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
    if nx == 0 or ny == 0:
        return None
    similarity = sum(p * q for p, q in zip(x, y)) / (nx * ny)
    ratio = min(nx, ny) / max(nx, ny)
    return Comparison(similarity, ratio, verdict(similarity, ratio, near=near))


BANDS = 4  # band keys of a fingerprint, for finding "same" candidates through an index
BAND_BITS = 16


def band_keys(blob: bytes | list[float]) -> list[int]:
    """Four 16-bit keys made of the signs of the first 64 values (a SimHash in bands).

    Two fingerprints of the same ΔW differ by rounding, which flips a sign only where a value is
    about 0 (about one value in a thousand for a bf16 copy): they share at least one band key but
    with a probability below 1e-7 (below 1e-3 even at the limit of the 'same' verdict), while two
    unrelated ones share a given band with probability 2⁻¹⁶.
    """
    values = floats(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else blob
    if values is None:
        return []
    keys = []
    for band in range(BANDS):
        chunk = values[band * BAND_BITS:(band + 1) * BAND_BITS]
        keys.append(sum(1 << i for i, v in enumerate(chunk) if v >= 0))
    return keys


def verdict(similarity: float, norm_ratio: float, *, near: float = NEAR_COSINE) -> str:
    """``same`` (the same ΔW up to rounding), ``near`` (cosine at least ``near``) or ``different``."""
    if similarity >= SAME_COSINE and norm_ratio >= 1 - SAME_NORM_RATIO:
        return "same"
    return "near" if similarity >= near else "different"


# -- computing -------------------------------------------------------------------------------- #

_PROBE_CACHE: dict[tuple[int, int], Any] = {}


def _probes(width: int, side: int) -> np.ndarray:
    """Fixed ±1 probes ``[width, PROBES]`` for a layer width (side 0: input, 1: output).

    numpy's legacy RandomState is used for its guaranteed stream: the same probes on every
    machine and numpy version, so fingerprints stored by one lorareg compare with another's.
    """
    key = (width, side)
    found = _PROBE_CACHE.get(key)
    if found is None:
        import numpy as np

        signs = np.random.RandomState((2 * width + side) % 2**32).randint(0, 2, size=(width, PROBES))
        found = _PROBE_CACHE[key] = (signs * 2 - 1).astype(np.float32)
    return found


_SLOT_CACHE: dict[str, tuple[Any, Any]] = {}


def _slots(key: str) -> tuple[Any, Any]:
    """Where a module's PROBES² numbers go in the fingerprint, and with which sign (from its key).

    Cached: the same module keys recur in every adapter of an architecture.
    """
    found = _SLOT_CACHE.get(key)
    if found is not None:
        return found
    import numpy as np

    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=2 * PROBES * PROBES, person=b"lorareg-fp").digest()
    raw = np.frombuffer(digest, dtype=np.uint8)
    buckets = raw[0::2].astype(np.intp) % DIMENSIONS
    signs = np.where(raw[1::2] & 1, np.float64(1), np.float64(-1))
    if len(_SLOT_CACHE) < 100_000:
        _SLOT_CACHE[key] = (buckets, signs)
    return buckets, signs


_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


def decode(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor bytes as a float32 array; bf16 by widening its bits. Raises ValueError for other dtypes."""
    import numpy as np

    if dtype == "BF16":
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    elif dtype in _NUMPY_DTYPES:
        values = np.frombuffer(raw, dtype=_NUMPY_DTYPES[dtype]).astype(np.float32)
    else:
        raise ValueError(f"dtype {dtype} is not a float format lorareg fingerprints")
    return values.reshape(shape)


_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class Scratch:
    """Float32 buffers that one fingerprint reuses from group to group (by name: ``down``, ``up``).

    Widening into memory the process already holds is several times faster than into new memory,
    which the system must first map and zero: for a full-size SDXL file the fresh pages cost more
    than the conversion itself. The buffers go when the fingerprint is done."""

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}

    def get(self, name: str, shape: tuple[int, ...]):
        """A float32 torch tensor of ``shape`` over the buffer ``name`` (grown when too small)."""
        import torch

        count = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < count:
            buffer = self._buffers[name] = torch.empty(count, dtype=torch.float32)
        return buffer[:count].view(shape)


def decode_group(raws: list[bytes], dtype: str, shape: tuple[int, ...], scratch: Scratch | None = None,
                 slot: str = "values") -> np.ndarray:
    """Several tensors of one dtype and shape as one float32 array ``[len(raws), *shape]``.

    In a process that has already imported torch (a command that just wrote the adapter), torch
    widens the values: the same exact conversion as :func:`decode`, about ten times faster than
    numpy's half-precision cast, into ``scratch``'s buffer ``slot`` when given (the array is then
    valid until that buffer is used again). Otherwise (a catalog scan, which never imports torch)
    numpy does.
    """
    torch = sys.modules.get("torch")
    if torch is None or dtype not in _TORCH_DTYPES or sys.byteorder != "little":
        return decode(b"".join(raws), dtype, (len(raws), *shape))
    import warnings

    source_dtype = getattr(torch, _TORCH_DTYPES[dtype])
    out = scratch.get(slot, (len(raws), *shape)) if scratch is not None else \
        torch.empty((len(raws), *shape), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffers, which are only read here
        for row, raw in zip(out, raws):
            if len(raw) != row.numel() * source_dtype.itemsize:
                raise ValueError("the tensor's bytes do not match its shape")
            row.copy_(torch.frombuffer(raw, dtype=source_dtype).view(shape))
    return out.numpy()


def file_reader(source: TensorSource, name: str) -> bytes:
    """Read one tensor's bytes from its safetensors file (the default reader)."""
    info = source.header.tensors[name]
    with open(source.path, "rb") as f:
        f.seek(source.header.data_start + info.begin)
        raw = f.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise ValueError("the file is truncated")
    return raw


def _tensor(entry: ModuleEntry, name: str, read: RawReader) -> np.ndarray:
    source = entry.source
    if source.header is None:
        raise ValueError("its tensors are not in a safetensors file")
    return decode(read(source, name), source.dtypes[name], source.shapes[name])


def module_sketch(entry: ModuleEntry, read: RawReader) -> np.ndarray:
    """The ``PROBES × PROBES`` sketch ``Qᵀ ΔW P`` of one module, in float64."""
    import numpy as np

    down, up = _tensor(entry, entry.down, read), _tensor(entry, entry.up, read)
    rank = down.shape[0]
    up = up.reshape(up.shape[0], rank)
    if entry.rows is not None:  # one part of a fused layer: its rows of the shared factors' product
        up = up[entry.rows[0]: entry.rows[1]]
    if entry.swap:  # stored with the halves of its rows exchanged
        up = np.concatenate(np.split(up, 2)[::-1])
    if entry.mid is None:
        flat = down.reshape(rank, -1)
        projected = flat @ _probes(flat.shape[1], 0)  # [rank, PROBES]
    else:  # 1×1 down, then a k×k mid: ΔW[o, i, a, b] = Σ up[o, m] mid[m, l, a, b] down[l, i]
        mid = _tensor(entry, entry.mid, read)
        kernel = mid.shape[2] * mid.shape[3]
        probes = _probes(down.shape[1] * kernel, 0).reshape(down.shape[1], kernel, PROBES)
        inner = np.einsum("li,iak->lak", down.reshape(rank, -1), probes)
        projected = np.einsum("mla,lak->mk", mid.reshape(rank, rank, kernel), inner)
    outputs = _probes(up.shape[0], 1).T @ up  # [PROBES, rank]
    return entry.effective_alpha / rank * (outputs.astype(np.float64) @ projected.astype(np.float64))


# Module kinds whose ΔW the fingerprint leaves out, and why.
_UNSKETCHED = {"dora": "a DoRA module's ΔW depends on the base model's weights",
               "norm": "a norm-layer difference is no weight matrix"}


def kind_sketch(entry: ModuleEntry, read: RawReader) -> np.ndarray:
    """The sketch of a LyCORIS module (LoHa, LoKr, full difference), computed by the module's own
    ``apply`` (:mod:`loralib.lycoris.kinds`, torch) on the same probes: ``Qᵀ ΔW P`` in float64."""
    import numpy as np
    import torch

    from .compose.parallel import single_threaded_torch

    module = entry.build({n: torch.from_numpy(np.ascontiguousarray(_tensor(entry, n, read)))
                          for n in entry.tensor_names()}).to(torch.float64)
    out, width = module.flat_shape
    with single_threaded_torch():  # a few small products: more threads only wait for each other
        responses = module.apply(torch.from_numpy(_probes(width, 0).T.astype(np.float64)))  # [PROBES, out]
    return _probes(out, 1).T.astype(np.float64) @ responses.numpy().T


def _group_sketches(entries: list[ModuleEntry], read: RawReader, scratch: Scratch | None = None) -> np.ndarray:
    """The sketches of modules whose factors have the same shapes, computed together: ``[len, PROBES, PROBES]``."""
    import numpy as np

    first, count = entries[0], len(entries)
    if first.source.header is None:
        raise ValueError("its tensors are not in a safetensors file")
    down_shape, up_shape = first.source.shapes[first.down], first.source.shapes[first.up]
    # one decode per factor kind: the group's modules share shapes and dtypes
    downs = decode_group([read(e.source, e.down) for e in entries], first.source.dtypes[first.down], down_shape,
                         scratch, "down")
    ups = decode_group([read(e.source, e.up) for e in entries], first.source.dtypes[first.up], up_shape, scratch, "up")
    rank = downs.shape[1]
    flat = downs.reshape(count, rank, -1)
    projected = flat @ _probes(flat.shape[2], 0)  # [count, rank, PROBES]
    outputs = _probes(ups.shape[1], 1).T @ ups.reshape(count, ups.shape[1], rank)  # [count, PROBES, rank]
    scales = np.array([e.effective_alpha / rank for e in entries], dtype=np.float64)
    return scales[:, None, None] * (outputs.astype(np.float64) @ projected.astype(np.float64))


# Modules of one shape are decoded together up to this many bytes of float32 values, so that the
# memory a fingerprint needs stays small whatever the adapter's size. Small enough that a group's
# values are still in the CPU's cache when they are multiplied: on a full-size SDXL file, 4 MiB
# groups fingerprint in 0.6-0.7 times the time of 64 MiB ones (the values are the same either way).
GROUP_BYTES = 4 * 2**20


def _values(*shapes: tuple[int, ...]) -> int:
    return sum(math.prod(shape) for shape in shapes)


def fingerprint(index: AdapterIndex, read: RawReader | None = None) -> Fingerprint:
    """The fingerprint of an indexed plain-LoRA adapter; ``read`` gives tensor bytes (default: from the files).

    A module that cannot be read (unsupported dtype, non-finite values, truncated data) is left out
    and named in ``skipped``. Modules with factors of the same shapes are computed together.
    """
    import numpy as np

    read = read or file_reader
    groups: dict[tuple, list[str]] = {}
    skipped: dict[str, str] = {}
    for key in sorted(index.modules):
        entry = index.modules[key]
        if entry.kind in _UNSKETCHED:
            skipped[key] = _UNSKETCHED[entry.kind]
            continue
        if entry.kind != "lora":  # LoHa, LoKr, full differences: one at a time, by their own ΔW code
            groups.setdefault(("kind", key), []).append(key)
            continue
        shapes = entry.source.shapes
        dtypes = entry.source.dtypes
        alone = entry.mid is not None or entry.rows is not None or entry.swap  # CP mid, a fused layer's part
        group = (("single", key) if alone else
                 (shapes[entry.down], shapes[entry.up], dtypes[entry.down], dtypes[entry.up], entry.source.header is None))
        members = groups.setdefault(group, [])
        if not alone and len(members) * _values(shapes[entry.down], shapes[entry.up]) * 4 >= GROUP_BYTES:
            groups[(*group, key)] = groups.pop(group)  # full: a new group of these shapes starts here
            members = groups.setdefault(group, [])
        members.append(key)
    keys, sketches = [], []
    scratch = Scratch()
    for group, members in groups.items():
        entries = [index.modules[k] for k in members]
        if group[0] == "kind":
            try:
                sketches.append(kind_sketch(entries[0], read)[None])
                keys += members
            except ImportError:
                skipped[members[0]] = f"fingerprinting a {entries[0].kind} module needs lorareg[compose] (torch)"
            except (ValueError, KeyError, OSError, RuntimeError) as exc:
                skipped[members[0]] = str(exc) or type(exc).__name__
            continue
        try:
            found = (_group_sketches(entries, read, scratch) if group[0] != "single"
                     else module_sketch(entries[0], read)[None])
        except (ValueError, KeyError, OSError):
            found = None
        if found is None:  # one bad module must not hide the others: one at a time
            for key, entry in zip(members, entries):
                try:
                    one = module_sketch(entry, read)[None]
                except (ValueError, KeyError, OSError) as exc:
                    skipped[key] = str(exc) or type(exc).__name__
                    continue
                keys.append(key)
                sketches.append(one)
            continue
        keys += members
        sketches.append(found)
    vector = np.zeros(DIMENSIONS, dtype=np.float64)
    used = 0
    if sketches:
        stacked = np.concatenate(sketches).reshape(len(keys), -1)
        finite = np.isfinite(stacked).all(axis=1)
        for key in (k for k, ok in zip(keys, finite) if not ok):
            skipped[key] = "non-finite values"
        slots = [_slots(k) for k, ok in zip(keys, finite) if ok]
        if slots:
            buckets = np.concatenate([b for b, _ in slots])
            signs = np.concatenate([s for _, s in slots])
            vector = np.bincount(buckets, weights=signs * stacked[finite].ravel(), minlength=DIMENSIONS)
            used = len(slots)
    return Fingerprint(vector.astype(np.float32), used, dict(sorted(skipped.items())))


def fingerprint_file(path: str, *, allow_pickle: bool = False) -> Fingerprint:
    """The fingerprint of the adapter at ``path`` (a file or an adapter folder), reading only its factors."""
    from .formats import index_adapter

    return fingerprint(index_adapter(path, allow_pickle=allow_pickle))


def pack(values: list[float]) -> bytes:
    """A fingerprint vector in its stored form (for tests and tools that build one by hand)."""
    return MAGIC + struct.pack(f"<{len(values)}f", *values)
