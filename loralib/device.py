"""Where composition computes: the CPU or a CUDA GPU (``--device auto|cpu|cuda``).

``auto`` is the GPU when torch sees one, else the CPU. Inputs are read and outputs written on the
CPU whatever the device: each module's factors go to the device, are computed on there, and the
results come back before they are stored, so memory on the device holds a few modules at a time.
Random draws (DARE's masks, the randomized SVD's probes) are made on the CPU and copied, so a
seed gives the same result on every device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from .errors import InvalidArgumentError
from .vocabulary import DEVICES

if TYPE_CHECKING:
    import torch

Movable = TypeVar("Movable")


def resolve_device(choice: str | torch.device | None = "auto") -> torch.device:
    """The torch device that ``choice`` (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a device) means here.

    Raises :class:`InvalidArgumentError` (one line) for an unknown name or a GPU this machine lacks.
    """
    import torch

    if isinstance(choice, torch.device):
        device = choice
    else:
        name = (choice or "auto").strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name.split(":", 1)[0] not in DEVICES:
            raise InvalidArgumentError(f"unknown device {choice!r}", f"Choose one of {', '.join(DEVICES)}")
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise InvalidArgumentError(f"unknown device {choice!r}", "Write cuda or cuda:N, e.g. cuda:0") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError("--device cuda was asked for, but torch sees no CUDA GPU on this machine",
                                       "Use --device cpu (or auto), or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InvalidArgumentError(f"there is no GPU {device.index}: torch sees {count}",
                                       f"Use cuda:0 … cuda:{count - 1}")
    return device


def on_device(value: Movable, device: torch.device | None) -> Movable:
    """``value`` (a tensor or an adapter module) on ``device``; itself when that is where it is or ``device`` is None."""
    if value is None or device is None or device.type == "cpu":
        return value
    return value.to(device)


def workers_for(device: torch.device | None) -> int | None:
    """How many modules :func:`loralib.compose.parallel.map_modules` computes side by side: its
    default on the CPU, one at a time on a GPU (which runs each module's work in parallel itself)."""
    return 1 if device is not None and device.type != "cpu" else None

