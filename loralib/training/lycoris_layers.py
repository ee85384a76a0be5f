"""Trainable LyCORIS layers: LoHa and LoKr beside the base model's Linear and Conv2d layers.

Each layer is a child module (named ``lycoris``) of the frozen layer it adapts, and a forward hook
adds its output to the base layer's: ``y = base(x) + ΔW ∗ x``, with ``ΔW`` formed from the factors
at every step — as LyCORIS' own modules do outside bypass mode (a Hadamard product has no cheaper
exact form, and a k×k conv needs the weight). The hook leaves the base layer's own ``forward``
alone, so fp8 base weights, gradient checkpointing and diffusers' model code work unchanged.

Parameter names, shapes and initialisation follow LyCORIS (``lycoris-lora`` 4.x):

- LoHa: ``hada_w1_a``/``hada_w2_a`` ``[out, r]``, ``hada_w1_b``/``hada_w2_b`` ``[r, in·kh·kw]``;
  ``w1_b`` and ``w2_b`` drawn from N(0, 1), ``w1_a`` from N(0, 0.1²), ``w2_a`` zero, so ``ΔW`` starts at
  zero; ``ΔW = alpha / r · (w1_a w1_b) ⊙ (w2_a w2_b)``.
- LoKr: each side of the weight split by :func:`~loralib.lycoris.shapes.factorization` (``factor``);
  ``lokr_w1`` ``[out₁, in₁]`` full (or ``lokr_w1_a @ lokr_w1_b`` with ``decompose_both`` when the rank
  is below half its larger side), ``lokr_w2`` ``[out₂, in₂(, kh, kw)]`` full when the rank is at least
  half its larger side, else ``lokr_w2_a [out₂, r] @ lokr_w2_b [r, in₂·kh·kw]``; the zero factor is
  ``w2`` (full) or ``w2_b``, the others Kaiming-uniform. ``ΔW = alpha / r · kron(W1, W2)``, and with both
  factors full ``alpha = r`` (scale 1), as LyCORIS sets it.

:meth:`TrainedLycoris.export` turns a layer into the :mod:`loralib.lycoris.kinds` module every
writer stores (kohya's LyCORIS keys).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lycoris.kinds import LohaModule, LokrModule
from ..lycoris.shapes import factorization

#: Name of the trainable child module under each adapted layer (and in the trainable parameters' names).
CHILD = "lycoris"
KINDS = ("loha", "lokr")


class TrainedLycoris(nn.Module):
    """A LyCORIS layer for one base ``nn.Linear`` or ``nn.Conv2d``: ``forward(x)`` is ``ΔW ∗ x``."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float) -> None:
        super().__init__()
        self.weight_shape = tuple(base.weight.shape)
        self.conv = isinstance(base, nn.Conv2d)
        self.options = (base.stride, base.padding, base.dilation, base.groups) if self.conv else None
        self.rank = rank
        self.alpha = alpha

    @property
    def flat_in(self) -> int:
        """``in·kh·kw``: the columns of ``ΔW`` as a matrix."""
        return math.prod(self.weight_shape[1:])

    @property
    def kernel(self) -> tuple[int, int] | None:
        """The conv kernel, None for a Linear layer."""
        return tuple(self.weight_shape[2:]) if self.conv else None

    def delta(self) -> torch.Tensor:
        """The dense ``ΔW`` in the base weight's shape (differentiable)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``ΔW`` applied to ``x`` as the base layer applies its weight."""
        weight = self.delta().to(x.dtype)
        if self.conv:
            stride, padding, dilation, groups = self.options
            return F.conv2d(x, weight, None, stride, padding, dilation, groups)
        return F.linear(x, weight)

    def export(self) -> LohaModule | LokrModule:
        """The trained factors as the lorareg module that writers store (float32 copies, on the CPU)."""
        raise NotImplementedError


def _copy(parameter: torch.Tensor | None) -> torch.Tensor | None:
    return None if parameter is None else parameter.detach().float().cpu().clone()


class TrainedLoha(TrainedLycoris):
    """LoHa: ``ΔW = alpha / r · (w1_a w1_b) ⊙ (w2_a w2_b)``."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float) -> None:
        super().__init__(base, rank, alpha)
        out = self.weight_shape[0]
        self.hada_w1_a = nn.Parameter(torch.empty(out, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, self.flat_in))
        self.hada_w2_a = nn.Parameter(torch.empty(out, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, self.flat_in))
        with torch.no_grad():  # LyCORIS' order of draws
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.normal_(self.hada_w2_b, std=1.0)
            nn.init.zeros_(self.hada_w2_a)

    def delta(self) -> torch.Tensor:
        """``alpha / r · (w1_a w1_b) ⊙ (w2_a w2_b)`` in the weight's shape."""
        product = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (product * (self.alpha / self.rank)).reshape(self.weight_shape)

    def export(self) -> LohaModule:
        """The :class:`~loralib.lycoris.kinds.LohaModule` of the trained factors."""
        return LohaModule(_copy(self.hada_w1_a), _copy(self.hada_w1_b), _copy(self.hada_w2_a), _copy(self.hada_w2_b),
                          self.alpha, kernel_size_hint=self.kernel)


class TrainedLokr(TrainedLycoris):
    """LoKr: ``ΔW = s · kron(W1, W2)`` with LyCORIS' factor shapes (see the module's docstring)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, *, factor: int = -1,
                 decompose_both: bool = False) -> None:
        super().__init__(base, rank, alpha)
        out_1, out_2 = factorization(self.weight_shape[0], factor)
        in_1, in_2 = factorization(self.weight_shape[1], factor)
        kernel = self.weight_shape[2:]
        self.lokr_w1 = self.lokr_w1_a = self.lokr_w1_b = None
        self.lokr_w2 = self.lokr_w2_a = self.lokr_w2_b = None
        if rank >= max(out_2, in_2) / 2:  # LyCORIS keeps W2 full when the rank would not save anything
            self.lokr_w2 = nn.Parameter(torch.zeros(out_2, in_2, *kernel))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_2, rank))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_2 * math.prod(kernel)))
        if decompose_both and rank < max(out_1, in_1) / 2:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_1, rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, in_1))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(out_1, in_1))
        with torch.no_grad():  # LyCORIS' order of draws: W2's up factor, then W1
            for parameter in (self.lokr_w2_a, self.lokr_w1, self.lokr_w1_a, self.lokr_w1_b):
                if parameter is not None:
                    nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))
        if self.lokr_w1 is not None and self.lokr_w2 is not None:
            self.alpha = float(rank)  # both factors full: LyCORIS ignores alpha (scale 1)

    @property
    def scale(self) -> float:
        """``alpha / r`` (1 with both factors full)."""
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """``s · kron(W1, W2)`` in the weight's shape."""
        left = self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b
        right = self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_a @ self.lokr_w2_b
        right = right.reshape(right.shape[0], -1)  # [out₂, in₂·kh·kw]: kron keeps in and kernel in weight order
        return (torch.kron(left, right) * self.scale).reshape(self.weight_shape)

    def export(self) -> LokrModule:
        """The :class:`~loralib.lycoris.kinds.LokrModule` of the trained factors."""
        return LokrModule(w1=_copy(self.lokr_w1), w1_a=_copy(self.lokr_w1_a), w1_b=_copy(self.lokr_w1_b),
                          w2=_copy(self.lokr_w2), w2_a=_copy(self.lokr_w2_a), w2_b=_copy(self.lokr_w2_b),
                          alpha=self.alpha, kernel_size_hint=self.kernel)


def _add_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + getattr(module, CHILD)(inputs[0])


def add_lycoris(model: nn.Module, settings: dict[str, tuple[int, float]], kind: str, *, factor: int = -1,
                decompose_both: bool = False) -> None:
    """Attach a trainable ``kind`` (``loha``/``lokr``) layer with the given ``(rank, alpha)`` to each named
    Linear/Conv2d of ``model``; only those layers will require gradients. Draws from torch's global
    generator (seed it first)."""
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name, (rank, alpha) in settings.items():
        base = modules[name]
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{name} is a {type(base).__name__}, not a Linear or Conv2d layer")
        if isinstance(base, nn.Conv2d) and base.padding_mode != "zeros":  # the hook pads with zeros
            raise TypeError(f"{name} pads with {base.padding_mode!r}; LoHa/LoKr layers support zero padding only")
        layer = (TrainedLoha(base, rank, alpha) if kind == "loha"
                 else TrainedLokr(base, rank, alpha, factor=factor, decompose_both=decompose_both))
        layer.to(base.weight.device)
        base.add_module(CHILD, layer)
        base.register_forward_hook(_add_output)


def lycoris_layers(model: nn.Module, targets: dict[str, str]) -> dict[str, TrainedLycoris]:
    """``{internal key: trained LyCORIS layer}`` of the layers :func:`add_lycoris` attached."""
    modules = dict(model.named_modules())
    return {key: getattr(modules[name], CHILD) for name, key in targets.items()
            if isinstance(getattr(modules.get(name), CHILD, None), TrainedLycoris)}
