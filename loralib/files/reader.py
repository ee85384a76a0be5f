"""Load tensors from a safetensors file whose header was validated."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import CorruptFileError
from .header import SafetensorsHeader


def read_tensors(header: SafetensorsHeader, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of the file ``header`` describes, as CPU tensors (read through safetensors' mmap)."""
    from safetensors import safe_open

    header.require_complete()
    try:
        with safe_open(str(header.path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}
    except Exception as exc:  # the file changed after its header was validated
        raise CorruptFileError(f"{header.path.name} could not be read: {exc}", "The file may be damaged") from exc
