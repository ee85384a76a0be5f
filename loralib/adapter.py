"""The one in-memory representation of a LoRA adapter.

A :class:`LoraAdapter` maps internal module keys (``unet.down_blocks.0…to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``; see :mod:`loralib.naming`) to
:class:`LoraModule` factors. Every file format is read into this and written from this (by
:mod:`loralib.formats`, which this module knows nothing of); nothing else in lorareg knows how a
format spells its keys.

Alpha follows kohya's convention everywhere: a module adds ``ΔW = (alpha / rank) · up @ down``.
Readers translate other conventions (PEFT's per-module patterns, rsLoRA's ``alpha / √rank``,
diffusers' scale of 1) into this one exactly, so conversion never changes ``ΔW``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .architectures import COMPONENTS, UNKNOWN
from .errors import CorruptFileError

if TYPE_CHECKING:
    from .files.hashes import Deferred


@dataclass
class LoraModule:
    """The low-rank factors of one adapted Linear or Conv2d layer.

    Linear: ``down`` is ``[r, in]``, ``up`` is ``[out, r]``. Conv (LoCon): ``down`` is
    ``[r, in, kh, kw]`` and ``up`` is ``[out, r, 1, 1]``; with a CP-decomposed ``mid`` of shape
    ``[r, r, kh, kw]`` the ``down`` is a ``1×1`` conv instead.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    mid: torch.Tensor | None = None

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
        return LoraModule(down.to(self.dtype), self.up, self.alpha)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` as matrices ``[out, r]`` and ``[r, in·kh·kw]`` (mid folded, scale not applied)."""
        module = self.without_mid()
        return module.up.reshape(module.out_features, module.rank).to(dtype), module.down.reshape(module.rank, -1).to(dtype)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``ΔW = scale · up @ down`` in the base weight's shape. Costs ``out × in`` memory."""
        up, down = self.factors(torch.float32)
        return (self.scale * (up @ down)).reshape(self.weight_shape).to(dtype)

    def to(self, dtype: torch.dtype) -> LoraModule:
        """The same module with factors cast to ``dtype``."""
        mid = None if self.mid is None else self.mid.to(dtype)
        return replace(self, down=self.down.to(dtype), up=self.up.to(dtype), mid=mid)

    @property
    def parameter_count(self) -> int:
        """Number of stored values in the factors."""
        return sum(t.numel() for t in (self.down, self.up, self.mid) if t is not None)

    def is_finite(self, dtype: torch.dtype | None = None) -> bool:
        """True when every factor value is finite (stored in ``dtype``, when given: a float32 value
        above 65504 becomes infinite in float16)."""
        return all(bool(torch.isfinite(t if dtype is None else t.to(dtype)).all())
                   for t in (self.down, self.up, self.mid) if t is not None)


@dataclass
class LoraAdapter:
    """A LoRA adapter: modules keyed by component and module path, plus what is known about it."""

    modules: dict[str, LoraModule]
    architecture: str = UNKNOWN
    source_format: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    source_path: Path | None = None
    source_hash: Deferred | None = field(default=None, repr=False)  # SHA-256 of the source's tensor data

    @property
    def components(self) -> list[str]:
        """The model components the adapter changes, in pipeline order."""
        present = {key.split(".", 1)[0] for key in self.modules}
        return [c for c in COMPONENTS if c in present]

    @property
    def ranks(self) -> list[int]:
        """Distinct module ranks, ascending."""
        return sorted({m.rank for m in self.modules.values()})

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
        """SHA-256 of the source file's tensor data (its identity; hashed while it loads), or None."""
        return self.source_hash.result() if self.source_hash is not None else None

    def nonfinite_modules(self, dtype: torch.dtype | None = None) -> list[str]:
        """Keys of the modules with a NaN or infinite factor value (once stored in ``dtype``, when given)."""
        return [key for key, module in self.modules.items() if not module.is_finite(dtype)]

    def to(self, dtype: torch.dtype) -> LoraAdapter:
        """A copy with every factor cast to ``dtype``."""
        return replace(self, modules={k: m.to(dtype) for k, m in self.modules.items()})
