"""Recording what an operation wrote: the output adapter, its parents, weights and parameters.

Shared by the commands (``lorareg merge``, ``convert``…) and the playground's actions, so an
adapter written from either is recorded the same way.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from loralib.records import OperationRecord

from .catalog import AddResult, Catalog

if TYPE_CHECKING:
    from loralib.formats.base import SaveResult


def record_output(result: SaveResult, home: str | os.PathLike | None = None, *, name: str | None = None) -> AddResult:
    """Record a written adapter (a loralib ``SaveResult``) and its lineage in the catalog at ``home``.

    The operation is the record the writer stored in the file (``result.operation``: inputs with
    their hashes, weights and parameters). The hashes the writer computed are reused, except for a
    PEFT folder, whose identifying file the catalog picks itself.
    """
    hashes = result.hashes if result.format != "peft" else None
    with Catalog(home) as catalog:
        return catalog.register_output(result.path, result.operation or OperationRecord("write"), hashes=hashes,
                                       name=name)
