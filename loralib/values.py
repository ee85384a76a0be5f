"""Checks on tensor values that reading, composing and writing share."""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no value of ``tensor`` is NaN or infinite.

    A sum is non-finite whenever a term is, and summing is several times faster than ``isfinite``
    on half-precision tensors (no boolean copy); only when the sum itself is not finite — a NaN, or
    an overflow of large finite values — is every value looked at."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())
