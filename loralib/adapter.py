"""The one in-memory representation of a LoRA adapter.

A :class:`LoraAdapter` maps internal module keys (``unet.down_blocks.0…to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``; see :mod:`loralib.naming`) to
modules: :class:`LoraModule` factors, or one of the LyCORIS/DoRA kinds of
:mod:`loralib.lycoris.kinds`, all following :class:`AdapterModule`. Every file format is read
into this and written from this (by :mod:`loralib.formats`, which this module knows nothing of);
nothing else in lorareg knows how a format spells its keys.

Alpha follows kohya's convention everywhere: a module adds ``ΔW = (alpha / rank) · up @ down``.
Readers translate other conventions (PEFT's per-module patterns, rsLoRA's ``alpha / √rank``,
diffusers' scale of 1) into this one exactly, so conversion never changes ``ΔW``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from .architectures import COMPONENTS, UNKNOWN
from .errors import CorruptFileError
from .values import all_finite

if TYPE_CHECKING:
    from .files.hashes import Deferred


class AdapterModule(Protocol):
    """What every module kind offers (:class:`LoraModule` and :mod:`loralib.lycoris.kinds`).

    ``kind`` names it (``lora``, ``loha``, ``lokr``, ``full``, ``norm``, ``dora``). Matrices are the
    layer's weight flattened to ``[out, in·kh·kw]``. ``delta`` is the dense ``ΔW`` in the weight's
    shape (None when only a bias changes; DoRA needs ``base``, the layer's weight); ``apply(x)``
    is ``ΔW`` applied to the rows of ``x`` (``[..., in·kh·kw] → [..., out]``), computed from the
    factors; ``low_rank`` is ``(up, down, coefficient)`` with ``ΔW = coefficient · up @ down``
    exactly, or None where no low-rank form exists (full differences, norms, DoRA).
    """

    kind: ClassVar[str]
    needs_base: ClassVar[bool]

    @property
    def weight_shape(self) -> tuple[int, ...]: ...
    @property
    def out_features(self) -> int: ...
    @property
    def in_features(self) -> int: ...
    @property
    def kernel_size(self) -> tuple[int, int]: ...
    @property
    def is_conv(self) -> bool: ...
    @property
    def is_matrix(self) -> bool: ...
    @property
    def rank(self) -> int | None: ...
    @property
    def exact_rank(self) -> int | None: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def parameter_count(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def to(self, dtype: torch.dtype) -> AdapterModule: ...
    def delta(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> torch.Tensor | None: ...
    def bias_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None: ...
    def apply(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor: ...
    def low_rank(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, float] | None: ...
    def tensors(self) -> dict[str, torch.Tensor | None]: ...


def is_finite(module: AdapterModule, dtype: torch.dtype | None = None) -> bool:
    """True when every stored value of ``module`` is finite (once stored in ``dtype``, when given:
    a float32 value above 65504 becomes infinite in float16)."""
    return all(all_finite(t if dtype is None else t.to(dtype)) for t in module.tensors().values() if t is not None)


@dataclass
class LoraModule:
    """The low-rank factors of one adapted Linear or Conv2d layer.

    Linear: ``down`` is ``[r, in]``, ``up`` is ``[out, r]``. Conv (LoCon): ``down`` is
    ``[r, in, kh, kw]`` and ``up`` is ``[out, r, 1, 1]``; with a CP-decomposed ``mid`` of shape
    ``[r, r, kh, kw]`` the ``down`` is a ``1×1`` conv instead. ``bias`` is a full difference of the
    layer's bias that some trainers add beside the factors (``diff_b``; plain LoRA formats cannot hold it).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    mid: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    kind: ClassVar[str] = "lora"
    needs_base: ClassVar[bool] = False
    is_matrix: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.alpha = float(self.alpha)
        problem = self._shape_problem()
        if problem:
            raise CorruptFileError(f"inconsistent LoRA factors: {problem}")

    def _shape_problem(self) -> str | None:
        down, up, mid = self.down, self.up, self.mid
        if down.ndim not in (2, 4) or up.ndim != down.ndim:
            return f"down {list(down.shape)} and up {list(up.shape)} must both be 2-D (Linear) or 4-D (Conv)"
        if up.shape[1] != down.shape[0]:
            return f"up {list(up.shape)} does not match the rank of down {list(down.shape)}"
        if down.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
            return f"conv up {list(up.shape)} must be a 1x1 convolution"
        if mid is not None:
            r = down.shape[0]
            if down.ndim != 4 or mid.ndim != 4 or tuple(mid.shape[:2]) != (r, r) or tuple(down.shape[2:]) != (1, 1):
                return f"mid {list(mid.shape)} does not fit down {list(down.shape)}"
        if not math.isfinite(self.alpha):
            return f"alpha is {self.alpha}"
        if self.bias is not None and tuple(self.bias.shape) != (up.shape[0],):
            return f"bias difference {list(self.bias.shape)} does not fit {up.shape[0]} outputs"
        return None

    @property
    def rank(self) -> int:
        """The LoRA rank ``r``."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """The factor applied to ``up @ down``: ``alpha / rank``."""
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        """True for a Conv2d (LoCon) module."""
        return self.down.ndim == 4

    @property
    def in_features(self) -> int:
        """Input features (channels) of the adapted layer."""
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        """Output features (channels) of the adapted layer."""
        return int(self.up.shape[0])

    @property
    def kernel_size(self) -> tuple[int, int]:
        """Kernel size of a conv module; ``(1, 1)`` for Linear."""
        source = self.mid if self.mid is not None else self.down
        return tuple(source.shape[2:]) if self.is_conv else (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base layer's weight (and of ``ΔW``)."""
        if self.is_conv:
            return (self.out_features, self.in_features, *self.kernel_size)
        return (self.out_features, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the factors."""
        return self.down.dtype

    def without_mid(self) -> LoraModule:
        """An equivalent module with the CP ``mid`` folded into ``down`` (computed in float32).

        A 1×1 conv followed by a k×k conv is one k×k conv, so the rank is unchanged.
        """
        if self.mid is None:
            return self
        down = torch.einsum("okab,ki->oiab", self.mid.float(), self.down.float()[:, :, 0, 0])
        return LoraModule(down.to(self.dtype), self.up, self.alpha, bias=self.bias)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` as matrices ``[out, r]`` and ``[r, in·kh·kw]`` (mid folded, scale not applied)."""
        module = self.without_mid()
        return module.up.reshape(module.out_features, module.rank).to(dtype), module.down.reshape(module.rank, -1).to(dtype)

    def delta(self, dtype: torch.dtype = torch.float32, base: torch.Tensor | None = None) -> torch.Tensor:
        """The dense ``ΔW = scale · up @ down`` in the base weight's shape (``base`` is not needed). Costs
        ``out × in`` memory."""
        up, down = self.factors(torch.float32)
        return (self.scale * (up @ down)).reshape(self.weight_shape).to(dtype)

    def to(self, dtype: torch.dtype) -> LoraModule:
        """The same module with factors cast to ``dtype``."""
        mid = None if self.mid is None else self.mid.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return replace(self, down=self.down.to(dtype), up=self.up.to(dtype), mid=mid, bias=bias)

    @property
    def parameter_count(self) -> int:
        """Number of stored values in the factors."""
        return sum(t.numel() for t in (self.down, self.up, self.mid, self.bias) if t is not None)

    @property
    def nbytes(self) -> int:
        """Bytes the factors occupy in their dtype."""
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.mid, self.bias) if t is not None)

    @property
    def exact_rank(self) -> int:
        """Rank of the exact low-rank form: the rank."""
        return self.rank

    def low_rank(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(up, down, scale)``: ``ΔW = scale · up @ down`` as matrices (mid folded)."""
        dtype = dtype or (torch.float64 if self.down.dtype == torch.float64 else torch.float32)
        up, down = self.factors(dtype)
        return up, down, self.scale

    def bias_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The bias difference stored beside the factors, if any."""
        return None if self.bias is None else self.bias.to(dtype)

    def apply(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """``ΔW`` applied to the rows of ``x`` (``[..., in·kh·kw] → [..., out]``) from the factors."""
        dtype = torch.float64 if torch.float64 in (x.dtype, self.down.dtype) else torch.float32
        up, down = self.factors(dtype)
        return self.scale * ((x.to(dtype) @ down.T) @ up.T)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The stored factors by field name."""
        return {"down": self.down, "up": self.up, "mid": self.mid, "bias": self.bias}


@dataclass
class LoraAdapter:
    """A LoRA adapter: modules keyed by component and module path, plus what is known about it."""

    modules: dict[str, AdapterModule]
    architecture: str = UNKNOWN
    source_format: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    source_path: Path | None = None
    source_hash: Deferred | None = field(default=None, repr=False)  # FileHashes of the source's files
    releaser: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    @property
    def components(self) -> list[str]:
        """The model components the adapter changes, in pipeline order."""
        present = {key.split(".", 1)[0] for key in self.modules}
        return [c for c in COMPONENTS if c in present]

    @property
    def ranks(self) -> list[int]:
        """Distinct module ranks, ascending (kinds without a rank are left out)."""
        return sorted({m.rank for m in self.modules.values() if m.rank is not None})

    @property
    def kinds(self) -> dict[str, int]:
        """How many modules of each kind (``lora``, ``loha``, ``lokr``, ``full``, ``norm``, ``dora``)."""
        counts: dict[str, int] = {}
        for m in self.modules.values():
            counts[m.kind] = counts.get(m.kind, 0) + 1
        return counts

    @property
    def is_plain(self) -> bool:
        """True when every module is a plain LoRA."""
        return all(m.kind == "lora" for m in self.modules.values())

    @property
    def dtype(self) -> torch.dtype | None:
        """The most common factor dtype."""
        counts: dict[torch.dtype, int] = {}
        for m in self.modules.values():
            counts[m.dtype] = counts.get(m.dtype, 0) + 1
        return max(counts, key=counts.get) if counts else None

    @property
    def parameter_count(self) -> int:
        """Number of stored values in all factors."""
        return sum(m.parameter_count for m in self.modules.values())

    @property
    def source_tensor_sha256(self) -> str | None:
        """SHA-256 of the source's main file's tensor data (AutoV3; hashed while it loads), or None."""
        return self.source_hash.result().tensor_sha256 if self.source_hash is not None else None

    @property
    def source_identity(self) -> str | None:
        """The identity of the source's content as stored (see :mod:`loralib.files.hashes`), or None."""
        return self.source_hash.result().identity if self.source_hash is not None else None

    def release(self, key: str) -> None:
        """Say that module ``key`` will not be read again soon: for an adapter loaded from files
        (whose tensors view the memory-mapped files) its pages leave this process's memory. The
        module stays valid (its bytes are read from the file again if touched). Streaming
        operations call this after each module, so their memory does not grow with the inputs."""
        if self.releaser is not None:
            self.releaser(key)

    def nonfinite_modules(self, dtype: torch.dtype | None = None) -> list[str]:
        """Keys of the modules with a NaN or infinite factor value (once stored in ``dtype``, when given).

        Each module is released once checked (see :meth:`release`), so checking a file-backed adapter
        does not bring all of it into memory at once. (Operations that read every module anyway check
        them as they go instead: see :class:`loralib.compose.inputs.FiniteCheck` and the writers.)"""
        bad = []
        for key, module in self.modules.items():
            if not is_finite(module, dtype):
                bad.append(key)
            self.release(key)
        return bad

    def to(self, dtype: torch.dtype) -> LoraAdapter:
        """A copy with every factor cast to ``dtype``."""
        return replace(self, modules={k: m.to(dtype) for k, m in self.modules.items()})
