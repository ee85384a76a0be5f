"""What merge, resize and extract return: the new adapter, its report, and the operation record."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .report import CompositionReport

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter
    from ..formats.base import SaveResult
    from ..records import OperationRecord


@dataclass
class Composition:
    """A computed adapter, not yet written.

    ``operation`` is the record that :meth:`save` stores in the file's ``lorareg.history``
    (inputs with their hashes and weights, method, rank, parameters).
    """

    adapter: LoraAdapter
    report: CompositionReport
    operation: OperationRecord

    def save(self, path: str | Path, format: str = "kohya", *, force: bool = False,
             dtype: torch.dtype | None = None, allow_nonfinite: bool = False,
             fused_rank: int | None = None) -> SaveResult:
        """Write the adapter (atomically; refuses to overwrite unless ``force``, and any input as the
        output) with its operation record. NaN or infinite values are refused unless ``allow_nonfinite``.

        ``fused_rank`` caps the rank of the layers the format fuses (Flux/SD3 ``qkv``, Flux ``linear1``;
        see :func:`loralib.save`): without it a fused layer holds its parts block-diagonally.
        """
        from ..formats import save_adapter

        return save_adapter(self.adapter, path, format, force=force, dtype=dtype, operation=self.operation,
                            allow_nonfinite=allow_nonfinite, fused_rank=fused_rank)

    def drop_factors(self) -> None:
        """Let go of the computed factors once they are written (the report and record stay), so that
        what follows does not hold the whole output in memory; the composition cannot be saved again."""
        self.adapter = replace(self.adapter, modules={})


def storage_bytes(adapter: LoraAdapter) -> int:
    """Bytes the adapter's factors occupy in their dtype (the tensor data of the written file)."""
    return sum(m.nbytes for m in adapter.modules.values())
