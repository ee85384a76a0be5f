"""The layer a LyCORIS module adapts, from its factors' shapes alone (no torch, no tensors).

Shared by the module classes (:mod:`loralib.lycoris.kinds`) and the header reader
(:mod:`loralib.formats.lycoris`), so ``inspect`` describes a file exactly as ``load`` builds it.
Shapes are tuples; a missing factor is None. Every function raises
:class:`~loralib.errors.CorruptFileError` for factors that cannot form one module.

LyCORIS flattens a conv's input and kernel into one axis for non-Tucker LoHa and LoKr factors,
so the kernel is then known only from the layer: :func:`spatial_kernel` names the 3×3
convolutions of the SD1.x, SD2.x and SDXL UNets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import CorruptFileError

Shape = tuple[int, ...]
_SPATIAL = re.compile(r"^unet\.(conv_in|conv_out|.*\.(conv1|conv2|conv))$")


def spatial_kernel(key: str) -> tuple[int, int] | None:
    """The kernel of a UNet layer that is a 3×3 convolution (resnet, down/upsampler, conv_in/out), else None."""
    return (3, 3) if _SPATIAL.match(key) else None


def product(shape: Sequence[int]) -> int:
    """The number of values in a tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of a LoKr side: ``(m, n)`` with ``m · n = dimension``, ``m ≤ n`` and ``m`` the largest divisor not above
    ``√dimension`` (and not above ``factor`` when it is positive)."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = int(dimension ** 0.5)
    if factor > 0:
        limit = min(limit, factor)
    m = max(d for d in range(1, limit + 1) if dimension % d == 0)
    return m, dimension // m


def weight_shape(out: int, flat_in: int, kernel: Sequence[int] | None, what: str) -> Shape:
    """The weight shape of a layer with ``out`` outputs and ``in·kh·kw`` inputs (``kernel`` None: Linear)."""
    if not kernel:
        return (int(out), int(flat_in))
    kh, kw = (int(k) for k in kernel)
    if flat_in % (kh * kw):
        raise CorruptFileError(f"{what}: {flat_in} input values do not split into a {kh}x{kw} kernel")
    return (int(out), flat_in // (kh * kw), kh, kw)


def loha_shape(w1_a: Shape, w1_b: Shape, w2_a: Shape, w2_b: Shape, t1: Shape | None = None, t2: Shape | None = None,
               kernel: Sequence[int] | None = None) -> tuple[Shape, int]:
    """``(weight shape, rank)`` of a LoHa module (rank: the rows of ``hada_w1_b``)."""
    what = f"LoHa factors of shapes {list(w1_a)}, {list(w1_b)}, {list(w2_a)}, {list(w2_b)}"
    if (t1 is None) != (t2 is None):
        raise CorruptFileError("a LoHa module has one Tucker core (hada_t1/hada_t2) without the other")
    if t1 is not None:
        ok = (len(w1_a) == len(w1_b) == len(w2_a) == len(w2_b) == 2 and len(t1) == len(t2) == 4
              and w1_a[1] == w2_a[1] and w1_b[1] == w2_b[1] and w1_a[0] == w1_b[0] == t1[0] == t1[1]
              and w2_a[0] == w2_b[0] == t2[0] == t2[1] and tuple(t1[2:]) == tuple(t2[2:]))
        if not ok:
            raise CorruptFileError(f"{what} do not fit their Tucker cores {list(t1)} and {list(t2)}")
        return weight_shape(w1_a[1], w1_b[1] * product(t1[2:]), t1[2:], what), int(w1_b[0])
    ok = (len(w1_a) in (2, 4) and len(w2_a) == len(w1_a) and len(w1_b) in (2, 4) and len(w2_b) == len(w1_b)
          and w1_b[0] == w1_a[1] and w2_b[0] == w2_a[1] and w1_a[0] == w2_a[0] and tuple(w1_b[1:]) == tuple(w2_b[1:])
          and product(w1_a[2:]) == product(w2_a[2:]) == 1 and w1_b[0] > 0)
    if not ok:
        raise CorruptFileError(f"{what} do not form one module")
    return weight_shape(w1_a[0], product(w1_b[1:]), w1_b[2:] if len(w1_b) == 4 else kernel, what), int(w1_b[0])


def lokr_shape(w1: Shape | None, w1_a: Shape | None, w1_b: Shape | None, w2: Shape | None, w2_a: Shape | None,
               w2_b: Shape | None, t2: Shape | None = None, kernel: Sequence[int] | None = None
               ) -> tuple[Shape, int | None]:
    """``(weight shape, rank)`` of a LoKr module; the rank is that of the decomposed factor
    (``w1``'s first), None when both factors are full."""
    if (w1 is None) == (w1_a is None or w1_b is None):
        raise CorruptFileError("a LoKr module needs either lokr_w1 or both lokr_w1_a and lokr_w1_b")
    if (w2 is None) == (w2_a is None or w2_b is None):
        raise CorruptFileError("a LoKr module needs either lokr_w2 or both lokr_w2_a and lokr_w2_b")
    if w1 is not None:
        if len(w1) != 2:
            raise CorruptFileError(f"lokr_w1 {list(w1)} is not a matrix")
        a, b = w1
    else:
        if len(w1_a) != 2 or len(w1_b) != 2 or w1_a[1] != w1_b[0]:
            raise CorruptFileError(f"lokr_w1_a {list(w1_a)} and lokr_w1_b {list(w1_b)} do not multiply")
        a, b = w1_a[0], w1_b[1]
    if w2 is not None:
        c, q = w2[0], product(w2[1:])
        kernel = tuple(w2[2:]) if len(w2) == 4 else kernel
    elif t2 is not None:
        if len(t2) != 4 or len(w2_a) != 2 or len(w2_b) != 2 or t2[0] != w2_a[0] or t2[1] != w2_b[0]:
            raise CorruptFileError(f"lokr_t2 {list(t2)} does not fit lokr_w2_a {list(w2_a)} and lokr_w2_b {list(w2_b)}")
        c, q, kernel = w2_a[1], w2_b[1] * product(t2[2:]), tuple(t2[2:])
    else:
        if len(w2_a) != 2 or len(w2_b) not in (2, 4) or w2_a[1] != w2_b[0]:
            raise CorruptFileError(f"lokr_w2_a {list(w2_a)} and lokr_w2_b {list(w2_b)} do not multiply")
        c, q = w2_a[0], product(w2_b[1:])
        kernel = tuple(w2_b[2:]) if len(w2_b) == 4 else kernel
    rank = w1_b[0] if w1 is None else (w2_b[0] if w2 is None else None)
    return weight_shape(a * c, b * q, kernel, "LoKr module"), None if rank is None else int(rank)


def full_shape(diff: Shape | None, diff_b: Shape | None) -> Shape:
    """The weight shape a full-rank difference adapts (a bias alone: its width)."""
    if diff is None and diff_b is None:
        raise CorruptFileError("a full-rank difference module has neither a weight nor a bias difference")
    if diff_b is not None and len(diff_b) != 1:
        raise CorruptFileError(f"the bias difference {list(diff_b)} is not a vector")
    if diff is not None and diff_b is not None and diff[0] != diff_b[0]:
        raise CorruptFileError(f"the weight difference {list(diff)} and bias difference {list(diff_b)} differ in width")
    return tuple(int(d) for d in diff) if diff is not None else (int(diff_b[0]),)


def magnitude_axis(magnitude: Shape, weight: Shape, style: str) -> str:
    """Whether a DoRA magnitude holds one value per output row (``"out"``) or per input channel (``"in"``).

    peft's ``lora_magnitude_vector`` is always per output (``[out]``, or ``[1, out, 1, 1]`` for a
    conv); LyCORIS' ``dora_scale`` is ``[out, 1, …]`` per output or ``[1, in, …]`` per input.
    """
    out, inputs = int(weight[0]), int(weight[1]) if len(weight) > 1 else int(weight[0])
    if style == "peft":
        if product(magnitude) == out:
            return "out"
    elif magnitude and magnitude[0] == out and product(magnitude[1:]) == 1:
        return "out"
    elif len(magnitude) >= 2 and magnitude[0] == 1 and magnitude[1] == inputs and product(magnitude[2:]) == 1:
        return "in"
    raise CorruptFileError(f"a DoRA magnitude of shape {list(magnitude)} fits neither the outputs nor the inputs of a "
                           f"{list(weight)} weight")
