"""The LyCORIS and DoRA module kinds, with their exact ``ΔW`` and their exact low-rank forms.

Each class follows LyCORIS' rules for its scale (checked against the ``lycoris-lora`` package's
functional weight code in the tests) and shares :class:`~loralib.adapter.AdapterModule` with
:class:`~loralib.adapter.LoraModule`. All matrices are the layer's weight flattened to
``[out, in·kh·kw]``; ``delta`` reshapes to the weight's shape.

- :class:`LohaModule`: ``ΔW = s · (W1a W1b) ⊙ (W2a W2b)``, ``s = alpha / r`` with ``r`` the rows of
  ``hada_w1_b``. Exactly low-rank: ``(A B) ⊙ (C D) = (A • C)(B ∗ D)`` with the face-splitting
  (row-wise Kronecker) product ``A • C`` and the column-wise Kronecker product ``B ∗ D``, rank
  ``r1·r2``. Tucker convs (``hada_t1/t2``) rebuild each half as ``t ×₁ W_aᵀ ×₂ W_bᵀ``.
- :class:`LokrModule`: ``ΔW = s · kron(W1, W2)``, each factor full (``lokr_w1``) or a product
  (``lokr_w1_a @ lokr_w1_b``; ``lokr_t2`` Tucker for a conv ``W2``). ``s = alpha / r`` with ``r``
  the rank of the decomposed factor (``w1`` first); with both factors full LyCORIS ignores alpha
  and uses ``s = 1``. Exactly low-rank: ``kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2)``.
- :class:`FullModule`: ``diff`` (and ``diff_b``) added as they are; no low-rank form.
- :class:`NormModule`: ``w_norm`` / ``b_norm`` added to a norm layer's weight and bias.
- :class:`DoraModule`: weight decomposition around a LoRA, LoHa or LoKr: ``W' = m · (W + ΔW) /
  ‖W + ΔW‖`` with the norm per output row or per input column (told by the magnitude's shape),
  so its ``ΔW = W' − W`` needs the base weight ``W``.

Alpha 0 or missing means alpha = rank (no scaling), as LyCORIS reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import torch

from ..errors import CorruptFileError, InvalidArgumentError
from .shapes import full_shape, loha_shape, lokr_shape, magnitude_axis, product

if TYPE_CHECKING:
    from ..adapter import LoraModule

Tensor = torch.Tensor


def _work(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (fp16/bf16 are never computed in)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _alpha(alpha: float | None, rank: int) -> float:
    """LyCORIS' rule: an alpha of 0 or none means alpha = rank (scale 1)."""
    return float(rank) if alpha is None or float(alpha) == 0 else float(alpha)


def _tucker(core: Tensor, right: Tensor, dtype: torch.dtype) -> Tensor:
    """``core [r, r, kh, kw]`` contracted with ``right [r, n]``: the ``[r, n·kh·kw]`` right factor of a
    Tucker-decomposed conv half (its left factor is the ``[r, out]`` matrix, transposed)."""
    return torch.einsum("ijhw,jn->inhw", core.to(dtype), right.to(dtype)).reshape(core.shape[0], -1)


def _identity_split(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """A full matrix as an exact product ``U @ V`` of inner size ``min(rows, cols)``."""
    rows, cols = matrix.shape
    if rows <= cols:
        return torch.eye(rows, dtype=matrix.dtype, device=matrix.device), matrix
    return matrix, torch.eye(cols, dtype=matrix.dtype, device=matrix.device)


def _check_bias(bias: Tensor | None, weight_shape: tuple[int, ...]) -> None:
    if bias is not None and tuple(bias.shape) != (weight_shape[0],):
        raise CorruptFileError(f"bias difference {list(bias.shape)} does not fit {weight_shape[0]} outputs")


def _bytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _count(*tensors: Tensor | None) -> int:
    return sum(t.numel() for t in tensors if t is not None)


class _Shaped:
    """Shape properties every matrix-valued kind derives from ``weight_shape``."""

    weight_shape: tuple[int, ...]

    @property
    def out_features(self) -> int:
        """Output features (channels) of the adapted layer."""
        return int(self.weight_shape[0])

    @property
    def in_features(self) -> int:
        """Input features (channels) of the adapted layer."""
        return int(self.weight_shape[1]) if len(self.weight_shape) > 1 else int(self.weight_shape[0])

    @property
    def kernel_size(self) -> tuple[int, int]:
        """Kernel size of a conv layer; ``(1, 1)`` for Linear."""
        return tuple(self.weight_shape[2:]) if len(self.weight_shape) == 4 else (1, 1)

    @property
    def is_conv(self) -> bool:
        """True for a Conv2d layer."""
        return len(self.weight_shape) == 4

    @property
    def flat_shape(self) -> tuple[int, int]:
        """``(out, in·kh·kw)``: the shape of ``ΔW`` as a matrix."""
        return self.out_features, product(self.weight_shape[1:])


class _Factors:
    """What a kind whose stored values are listed by ``tensors()`` derives from them."""

    def tensors(self) -> dict[str, Tensor | None]:
        raise NotImplementedError

    def to(self, dtype: torch.dtype):
        """The same module with every factor cast to ``dtype``."""
        cast = {name: (None if t is None else t.to(dtype)) for name, t in self.tensors().items()}
        return replace(self, **cast)

    @property
    def parameter_count(self) -> int:
        """Number of stored values."""
        return _count(*self.tensors().values())

    @property
    def nbytes(self) -> int:
        """Bytes the stored values occupy."""
        return _bytes(*self.tensors().values())


@dataclass
class LohaModule(_Shaped, _Factors):
    """LoHa: the Hadamard product of two low-rank products.

    Without Tucker cores ``w1_a``/``w2_a`` are ``[out, r]`` and ``w1_b``/``w2_b`` ``[r, in·kh·kw]``
    (or ``[r, in, kh, kw]``). With ``t1``/``t2`` (``[r, r, kh, kw]``) ``w1_a``/``w2_a`` are ``[r, out]``
    and ``w1_b``/``w2_b`` ``[r, in]``. ``kernel_size`` tells a conv's kernel when the factors are
    flattened (LyCORIS stores no kernel for them).
    """

    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    alpha: float | None = None
    t1: Tensor | None = None
    t2: Tensor | None = None
    kernel_size_hint: tuple[int, int] | None = None
    bias: Tensor | None = None  # a bias difference (diff_b) stored beside the factors

    kind: ClassVar[str] = "loha"
    needs_base: ClassVar[bool] = False

    def __post_init__(self) -> None:
        shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
        self.weight_shape, rank = loha_shape(shape(self.w1_a), shape(self.w1_b), shape(self.w2_a), shape(self.w2_b),
                                             shape(self.t1), shape(self.t2), self.kernel_size_hint)
        self.alpha = _alpha(self.alpha, rank)
        if not math.isfinite(self.alpha):
            raise CorruptFileError(f"LoHa alpha is {self.alpha}")
        _check_bias(self.bias, self.weight_shape)

    @property
    def rank(self) -> int:
        """LyCORIS' rank ("dim"): the rows of ``hada_w1_b``."""
        return int(self.w1_b.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return float(self.alpha) / self.rank

    @property
    def exact_rank(self) -> int:
        """Rank of the exact low-rank form: ``r1 · r2``."""
        return int(self.w1_b.shape[0]) * int(self.w2_b.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the factors."""
        return self.w1_a.dtype

    @property
    def is_matrix(self) -> bool:
        """LoHa changes a weight matrix (it can become a LoRA)."""
        return True

    def halves(self, dtype: torch.dtype) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``((A, B), (C, D))`` with ``ΔW = s · (A @ B) ⊙ (C @ D)`` as ``[out, in·kh·kw]`` matrices."""
        out = self.out_features
        if self.t1 is not None:
            return ((self.w1_a.to(dtype).T, _tucker(self.t1, self.w1_b, dtype)),
                    (self.w2_a.to(dtype).T, _tucker(self.t2, self.w2_b, dtype)))
        return ((self.w1_a.to(dtype).reshape(out, -1), self.w1_b.to(dtype).reshape(self.w1_b.shape[0], -1)),
                (self.w2_a.to(dtype).reshape(out, -1), self.w2_b.to(dtype).reshape(self.w2_b.shape[0], -1)))

    def low_rank(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, float]:
        """``(up, down, coefficient)`` with ``ΔW = coefficient · up @ down`` exactly (face-splitting)."""
        dtype = dtype or _work(self.w1_a)
        (a, b), (c, d) = self.halves(dtype)
        up = (a[:, :, None] * c[:, None, :]).reshape(a.shape[0], -1)
        down = (b[:, None, :] * d[None, :, :]).reshape(-1, b.shape[1])
        return up, down, self.scale

    def delta(self, dtype: torch.dtype = torch.float32, base: Tensor | None = None) -> Tensor:
        """The dense ``ΔW`` in the weight's shape. Costs ``out × in`` memory."""
        work = _work(self.w1_a)
        (a, b), (c, d) = self.halves(work)
        return (self.scale * ((a @ b) * (c @ d))).reshape(self.weight_shape).to(dtype)

    def bias_delta(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The bias difference stored beside the factors, if any."""
        return None if self.bias is None else self.bias.to(dtype)

    def apply(self, x: Tensor, base: Tensor | None = None) -> Tensor:
        """``ΔW`` applied to the rows of ``x`` (``[..., in·kh·kw]`` → ``[..., out]``), from the factors."""
        (a, b), (c, d) = self.halves(_work(x))
        flat = x.reshape(-1, b.shape[1]).to(a.dtype)
        inner = torch.einsum("pj,qj,tj->tpq", b, d, flat)
        result = torch.einsum("ip,iq,tpq->ti", a, c, inner)
        return (self.scale * result).reshape(*x.shape[:-1], a.shape[0])

    def tensors(self) -> dict[str, Tensor | None]:
        """The stored factors by field name."""
        return {"w1_a": self.w1_a, "w1_b": self.w1_b, "w2_a": self.w2_a, "w2_b": self.w2_b, "t1": self.t1, "t2": self.t2,
                "bias": self.bias}


@dataclass
class LokrModule(_Shaped, _Factors):
    """LoKr: the Kronecker product of two factors, each full or a low-rank product.

    ``w1`` ``[a, b]`` or ``w1_a @ w1_b``; ``w2`` ``[c, d(, kh, kw)]`` or ``w2_a [c, r] @ w2_b [r, d·kh·kw]``,
    or with a Tucker core ``t2 [r, r, kh, kw]``: ``w2_a [r, c]``, ``w2_b [r, d]``. The layer is
    ``[a·c, b·d(, kh, kw)]``.
    """

    w1: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t2: Tensor | None = None
    alpha: float | None = None
    kernel_size_hint: tuple[int, int] | None = None
    bias: Tensor | None = None  # a bias difference (diff_b) stored beside the factors

    kind: ClassVar[str] = "lokr"
    needs_base: ClassVar[bool] = False

    def __post_init__(self) -> None:
        shapes = {name: None if t is None else tuple(t.shape) for name, t in self.tensors().items() if name != "bias"}
        self.weight_shape, rank = lokr_shape(**shapes, kernel=self.kernel_size_hint)
        self.alpha = _alpha(self.alpha, rank if rank is not None else 1)
        if not math.isfinite(self.alpha):
            raise CorruptFileError(f"LoKr alpha is {self.alpha}")
        _check_bias(self.bias, self.weight_shape)

    def _left_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return int(self.w1.shape[0]), int(self.w1.shape[1])
        return int(self.w1_a.shape[0]), int(self.w1_b.shape[1])

    def _right_shape(self) -> tuple[int, int]:
        if self.w2 is not None:
            return int(self.w2.shape[0]), product(self.w2.shape[1:])
        if self.t2 is not None:
            return int(self.w2_a.shape[1]), int(self.w2_b.shape[1]) * product(self.t2.shape[2:])
        return int(self.w2_a.shape[0]), product(self.w2_b.shape[1:])

    @property
    def rank(self) -> int | None:
        """The rank of the decomposed factor (``w1``'s first), None when both factors are full."""
        if self.w1 is None:
            return int(self.w1_b.shape[0])
        if self.w2 is None:
            return int(self.w2_b.shape[0])
        return None

    @property
    def scale(self) -> float:
        """``alpha / rank``; 1 when both factors are full (LyCORIS ignores alpha then)."""
        rank = self.rank
        return 1.0 if rank is None else float(self.alpha) / rank

    @property
    def exact_rank(self) -> int:
        """Rank of the exact low-rank form: ``rank(W1) · rank(W2)`` (a full factor by its smaller side)."""
        left, right = self.factor_ranks()
        return left * right

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the factors."""
        return next(t for t in self.tensors().values() if t is not None).dtype

    @property
    def is_matrix(self) -> bool:
        """LoKr changes a weight matrix (it can become a LoRA)."""
        return True

    def factor_ranks(self) -> tuple[int, int]:
        """The inner sizes of the exact forms of ``W1`` and ``W2``."""
        left = min(self._left_shape()) if self.w1 is not None else int(self.w1_b.shape[0])
        right = min(self._right_shape()) if self.w2 is not None else int(self.w2_b.shape[0])
        return left, right

    def left(self, dtype: torch.dtype) -> Tensor:
        """``W1`` as a matrix ``[a, b]``."""
        return self.w1.to(dtype) if self.w1 is not None else self.w1_a.to(dtype) @ self.w1_b.to(dtype)

    def right_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """``(U2, V2)`` with ``W2 = U2 @ V2`` for a decomposed ``W2``; None for a full one."""
        if self.w2 is not None:
            return None
        if self.t2 is not None:
            return self.w2_a.to(dtype).T, _tucker(self.t2, self.w2_b, dtype)
        return self.w2_a.to(dtype), self.w2_b.to(dtype).reshape(self.w2_b.shape[0], -1)

    def left_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """``(U1, V1)`` with ``W1 = U1 @ V1`` for a decomposed ``W1``; None for a full one."""
        return None if self.w1 is not None else (self.w1_a.to(dtype), self.w1_b.to(dtype))

    def right(self, dtype: torch.dtype) -> Tensor:
        """``W2`` as a matrix ``[c, d·kh·kw]``."""
        factors = self.right_factors(dtype)
        if factors is None:
            return self.w2.to(dtype).reshape(self.w2.shape[0], -1)
        return factors[0] @ factors[1]

    def low_rank(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, float]:
        """``(up, down, coefficient)`` with ``ΔW = coefficient · up @ down`` exactly:
        ``kron(U1 V1, U2 V2) = kron(U1, U2) @ kron(V1, V2)``."""
        dtype = dtype or _work(*self.tensors().values())
        u1, v1 = self.left_factors(dtype) or _identity_split(self.left(dtype))
        u2, v2 = self.right_factors(dtype) or _identity_split(self.right(dtype))
        kron = lambda p, q: torch.kron(p.contiguous(), q.contiguous())  # noqa: E731
        return kron(u1, u2), kron(v1, v2), self.scale

    def delta(self, dtype: torch.dtype = torch.float32, base: Tensor | None = None) -> Tensor:
        """The dense ``ΔW`` in the weight's shape. Costs ``out × in`` memory."""
        work = _work(*self.tensors().values())
        kron = torch.kron(self.left(work).contiguous(), self.right(work).contiguous())
        return (self.scale * kron).reshape(self.weight_shape).to(dtype)

    def bias_delta(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The bias difference stored beside the factors, if any."""
        return None if self.bias is None else self.bias.to(dtype)

    def apply(self, x: Tensor, base: Tensor | None = None) -> Tensor:
        """``ΔW`` applied to the rows of ``x`` from the factors: ``kron(W1, W2) vec(X) = vec(W1 X W2ᵀ)``."""
        work = _work(x, *self.tensors().values())
        w1 = self.left(work)
        b = w1.shape[1]
        flat = x.reshape(-1, b, self.flat_shape[1] // b).to(work)
        factors = self.right_factors(work)
        if factors is None:
            mixed = flat @ self.right(work).T
        else:
            mixed = (flat @ factors[1].T) @ factors[0].T
        result = torch.einsum("ij,tjc->tic", w1, mixed).reshape(flat.shape[0], -1)
        return (self.scale * result).reshape(*x.shape[:-1], self.out_features)

    def tensors(self) -> dict[str, Tensor | None]:
        """The stored factors by field name."""
        return {"w1": self.w1, "w1_a": self.w1_a, "w1_b": self.w1_b, "w2": self.w2, "w2_a": self.w2_a,
                "w2_b": self.w2_b, "t2": self.t2, "bias": self.bias}


@dataclass
class FullModule(_Shaped):
    """A full-rank difference: ``diff`` added to the weight, ``diff_b`` to the bias (either may be absent).

    A ``diff`` of one dimension belongs to a norm layer (ComfyUI writes those as ``.diff`` too).
    """

    diff: Tensor | None = None
    diff_b: Tensor | None = None

    kind: ClassVar[str] = "full"
    needs_base: ClassVar[bool] = False
    alpha: ClassVar[float] = 1.0
    scale: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
        self.weight_shape = full_shape(shape(self.diff), shape(self.diff_b))

    @property
    def rank(self) -> None:
        """A full-rank difference has no LoRA rank."""
        return None

    @property
    def exact_rank(self) -> int | None:
        """No low-rank form is known without an SVD."""
        return None

    @property
    def is_matrix(self) -> bool:
        """True when ``diff`` changes a Linear or Conv weight (not a norm layer or a bias alone)."""
        return self.diff is not None and self.diff.ndim >= 2

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype."""
        return (self.diff if self.diff is not None else self.diff_b).dtype

    def low_rank(self, dtype: torch.dtype | None = None) -> None:
        """No exact low-rank form (a dense SVD finds one)."""
        return None

    def delta(self, dtype: torch.dtype = torch.float32, base: Tensor | None = None) -> Tensor | None:
        """``diff`` (None when only the bias changes)."""
        return None if self.diff is None else self.diff.to(dtype)

    def bias_delta(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """``diff_b``."""
        return None if self.diff_b is None else self.diff_b.to(dtype)

    def apply(self, x: Tensor, base: Tensor | None = None) -> Tensor:
        """``diff`` applied to the rows of ``x`` (elementwise for a norm layer's vector; zero without diff)."""
        work = _work(x, self.diff)
        if self.diff is None:
            return torch.zeros(*x.shape[:-1], self.weight_shape[0], dtype=work, device=x.device)
        if not self.is_matrix:
            return x.to(work) * self.diff.to(work)
        return x.to(work) @ self.diff.to(work).reshape(self.out_features, -1).T

    def tensors(self) -> dict[str, Tensor | None]:
        """The stored differences by field name."""
        return {"diff": self.diff, "diff_b": self.diff_b}

    def to(self, dtype: torch.dtype) -> FullModule:
        """The same module cast to ``dtype``."""
        return replace(self, diff=None if self.diff is None else self.diff.to(dtype),
                       diff_b=None if self.diff_b is None else self.diff_b.to(dtype))

    @property
    def parameter_count(self) -> int:
        """Number of stored values."""
        return _count(self.diff, self.diff_b)

    @property
    def nbytes(self) -> int:
        """Bytes the stored values occupy."""
        return _bytes(self.diff, self.diff_b)


@dataclass
class NormModule(FullModule):
    """LyCORIS' norm-layer module: ``w_norm`` added to a LayerNorm/GroupNorm weight, ``b_norm`` to its bias."""

    kind: ClassVar[str] = "norm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.diff is not None and self.diff.ndim != 1:
            raise CorruptFileError(f"w_norm {list(self.diff.shape)} is not a vector")


@dataclass
class DoraModule(_Shaped):
    """DoRA around an inner LoRA/LoHa/LoKr module: ``W' = m · (W + ΔW) / (‖W + ΔW‖ + eps)``.

    ``magnitude`` holds one value per output row (``axis="out"``: peft, and LyCORIS' default) or
    per input channel (``axis="in"``: LyCORIS' ``wd_on_output=False``, which most kohya-style
    DoRA files use). ``eps`` is what LyCORIS adds to the norm (the magnitude dtype's machine
    epsilon); peft adds nothing. ``weight_shape`` is the inner module's.
    """

    inner: LoraModule | LohaModule | LokrModule
    magnitude: Tensor
    axis: str = "out"
    eps: float = 0.0

    kind: ClassVar[str] = "dora"
    needs_base: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.weight_shape = tuple(self.inner.weight_shape)
        if self.axis not in ("out", "in"):
            raise ValueError(f"unknown DoRA axis {self.axis!r}")
        want = self.out_features if self.axis == "out" else self.in_features
        if self.magnitude.numel() != want:
            raise CorruptFileError(f"DoRA magnitude has {self.magnitude.numel()} values but the layer has {want} "
                                   f"{'outputs' if self.axis == 'out' else 'inputs'}")
        self.magnitude = self.magnitude.reshape(-1)

    @property
    def rank(self) -> int | None:
        """The inner module's rank."""
        return self.inner.rank

    @property
    def alpha(self) -> float:
        """The inner module's alpha."""
        return self.inner.alpha

    @property
    def scale(self) -> float:
        """The inner module's scale."""
        return self.inner.scale

    @property
    def exact_rank(self) -> None:
        """DoRA has no low-rank form: its ``ΔW`` depends on the base weight."""
        return None

    @property
    def inner_kind(self) -> str:
        """The kind of the decomposed module (``lora``, ``loha``, ``lokr``)."""
        return self.inner.kind

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the inner factors."""
        return self.inner.dtype

    @property
    def is_matrix(self) -> bool:
        """DoRA changes a weight matrix."""
        return True

    def low_rank(self, dtype: torch.dtype | None = None) -> None:
        """No low-rank form: ``ΔW`` depends on the base weight."""
        return None

    def tensors(self) -> dict[str, Tensor | None]:
        """The inner module's factors and the magnitude."""
        return {**self.inner.tensors(), "magnitude": self.magnitude}

    def require(self, base: Tensor | None) -> Tensor:
        """The base weight as a float matrix ``[out, in·kh·kw]``, or the error that says one is needed."""
        if base is None:
            raise InvalidArgumentError(
                "a DoRA module's ΔW depends on the base model's weights, which were not given",
                "Pass the base model (--base MODEL, or base= in Python)")
        out, flat = self.flat_shape
        if base.numel() != out * flat:
            raise InvalidArgumentError(f"the base weight has shape {list(base.shape)} but the DoRA module adapts a "
                                       f"{list(self.weight_shape)} weight", "Use the base model the adapter was made for")
        return base.reshape(out, flat)

    def merged(self, base: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W'``: the decomposed weight, as a matrix ``[out, in·kh·kw]`` in ``dtype``."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        weight = self.require(base).to(work)
        combined = weight + self.inner.delta(work).reshape(weight.shape)
        magnitude = self.magnitude.to(work)
        if self.axis == "out":
            norm = combined.norm(dim=1)
            return (combined * (magnitude / (norm + self.eps))[:, None]).to(dtype)
        out, inputs = self.out_features, self.in_features
        per_input = combined.reshape(out, inputs, -1)
        norm = per_input.transpose(0, 1).reshape(inputs, -1).norm(dim=1)
        return (per_input * (magnitude / (norm + self.eps))[None, :, None]).reshape(out, -1).to(dtype)

    def delta(self, dtype: torch.dtype = torch.float32, base: Tensor | None = None) -> Tensor:
        """``ΔW = W' − W`` in the weight's shape; needs ``base``, the layer's weight."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        weight = self.require(base).to(work)
        return (self.merged(base, work) - weight).reshape(self.weight_shape).to(dtype)

    def bias_delta(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The inner module's bias difference, if any (DoRA rescales the weight only)."""
        return self.inner.bias_delta(dtype)

    def apply(self, x: Tensor, base: Tensor | None = None) -> Tensor:
        """``ΔW`` applied to the rows of ``x``; needs ``base`` (the norms need the whole weight)."""
        work = _work(x)
        delta = self.delta(work, base).reshape(self.out_features, -1)
        return x.to(work) @ delta.T

    def to(self, dtype: torch.dtype) -> DoraModule:
        """The same module with the inner factors and the magnitude cast to ``dtype``."""
        return replace(self, inner=self.inner.to(dtype), magnitude=self.magnitude.to(dtype))

    @property
    def parameter_count(self) -> int:
        """Number of stored values (inner factors and magnitude)."""
        return self.inner.parameter_count + self.magnitude.numel()

    @property
    def nbytes(self) -> int:
        """Bytes the stored values occupy."""
        return self.inner.nbytes + _bytes(self.magnitude)


LYCORIS_KINDS = (LohaModule, LokrModule, FullModule, NormModule, DoraModule)


def dora(inner: LoraModule | LohaModule | LokrModule, magnitude: Tensor, style: str) -> DoraModule:
    """The DoRA module of a stored magnitude: ``style`` is ``"lycoris"`` (``dora_scale``, axis from its
    shape, LyCORIS' epsilon) or ``"peft"`` (``lora_magnitude_vector``, per output, no epsilon)."""
    axis = magnitude_axis(tuple(magnitude.shape), tuple(inner.weight_shape), style)
    eps = float(torch.finfo(magnitude.dtype).eps) if style == "lycoris" and magnitude.is_floating_point() else 0.0
    return DoraModule(inner, magnitude.reshape(-1), axis, eps)


def stored_magnitude(module: DoraModule, style: str) -> Tensor:
    """The magnitude in the shape a ``style`` file stores it (see :func:`dora`)."""
    conv = (1, 1) if module.is_conv else ()
    if style == "peft":
        if module.axis != "out":
            raise ValueError("peft stores per-output magnitudes only")
        return module.magnitude.reshape(1, -1, *conv) if conv else module.magnitude
    if module.axis == "out":
        return module.magnitude.reshape(-1, 1, *conv)
    return module.magnitude.reshape(1, -1, *conv)
