"""Names of tensor dtypes: the short ones users type (``fp16``) and safetensors' (``F16``).

Importing this module does not import torch; the functions that return torch dtypes do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# What users write for a storage precision (--dtype, save_dtype), and the torch dtype it means.
STORAGE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# safetensors' dtype names and the torch dtypes they store.
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def storage_dtype(name: str) -> torch.dtype:
    """The torch dtype of a user-facing precision name (``fp32``, ``fp16``, ``bf16``)."""
    import torch

    return getattr(torch, STORAGE_DTYPES[name])


def from_safetensors(name: str) -> torch.dtype:
    """The torch dtype that a safetensors dtype name (``F16``, ``BF16``, …) stores."""
    import torch

    return getattr(torch, SAFETENSORS_DTYPES[name])


def to_safetensors(dtype: torch.dtype) -> str | None:
    """The safetensors name of a torch dtype (None when safetensors cannot store it)."""
    if not _BY_DTYPE:
        import torch

        _BY_DTYPE.update({getattr(torch, attr): name for name, attr in SAFETENSORS_DTYPES.items()})
    return _BY_DTYPE.get(dtype)


_BY_DTYPE: dict[torch.dtype, str] = {}  # filled on first use, so that importing this module needs no torch
