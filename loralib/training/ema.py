"""An exponential moving average of the trained LoRA weights.

After optimizer step ``t`` (counted from 1), every averaged tensor moves towards the live one:
``ema ← ema + (1 − d_t) · (param − ema)`` with ``d_t = min(decay, (1 + t) / (10 + t))`` — the
warm-up diffusers' ``EMAModel`` uses by default, so that short runs are not dominated by the
initial weights (whose up factors are zero). The copy is float32, on the training device or on
the CPU (``ema_on_cpu``); it is saved in checkpoints, so resumed runs average exactly as
uninterrupted ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class EMA:
    """The moving average of named parameters."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float, on_cpu: bool = False) -> None:
        self.decay = decay
        self.parameters = parameters
        device = torch.device("cpu") if on_cpu else None
        self.shadow = {name: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                       for name, p in parameters.items()}

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step ``step`` (1-based)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the live weights after optimizer step ``step``."""
        weight = 1.0 - self.decay_at(step)
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        live = [self.parameters[n].detach().to(device=s.device, dtype=torch.float32) for n, s in zip(names, shadow)]
        torch._foreach_lerp_(shadow, live, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors (for checkpoints)."""
        return {name: tensor.detach().cpu() for name, tensor in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore averaged tensors saved by :meth:`state_dict` (names must match)."""
        if set(tensors) != set(self.shadow):
            from ..errors import MismatchError

            raise MismatchError("the checkpoint's EMA weights do not match this configuration's LoRA layers",
                                "Resume with the configuration the checkpoint was made with")
        for name, tensor in tensors.items():
            self.shadow[name].copy_(tensor)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Put the averaged weights into the live parameters for the duration of the block."""
        saved = {name: p.detach().clone() for name, p in self.parameters.items()}
        try:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(self.shadow[name].to(device=p.device, dtype=p.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(saved[name])
