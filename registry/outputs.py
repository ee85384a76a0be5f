"""Recording what an operation wrote: the output adapter, its parents, weights and parameters.

Shared by the commands (``lorareg merge``, ``convert``…) and the playground's actions, so an
adapter written from either is recorded the same way.
"""

from __future__ import annotations

import os
from typing import Any

from .catalog import AddResult, Catalog


def record_output(result: Any, operation: dict, home: str | os.PathLike | None = None, *,
                  name: str | None = None) -> AddResult:
    """Record a written adapter (a loralib ``SaveResult``) and its lineage in the catalog at ``home``.

    ``operation`` holds ``"operation"``, ``"inputs"`` (paths or input records), optional
    ``"weights"``, and the parameters. The hashes the writer computed are reused, except for a
    PEFT folder, whose identifying file the catalog picks itself.
    """
    hashes = result.hashes if getattr(result, "format", None) != "peft" else None
    with Catalog(home) as catalog:
        return catalog.register_output(result.path, operation, hashes=hashes, name=name)
