"""Recording what an operation wrote: the output adapter, its parents, weights and parameters.

Shared by the commands (``lorareg merge``, ``convert``…) and the playground's actions, so an
adapter written from either is recorded the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from loralib.files.hashes import Deferred
from loralib.records import OperationRecord

from .catalog import AddResult, Catalog
from .records import Entry

if TYPE_CHECKING:
    from loralib.formats.base import SaveResult


def record_output(result: SaveResult, home: str | os.PathLike | None = None, *, name: str | None = None,
                  samples: Iterable[str | os.PathLike | dict] = ()) -> AddResult:
    """Record a written adapter (a loralib ``SaveResult``) and its lineage in the catalog at ``home``,
    with the sample images made with it.

    The operation is the record the writer stored in the file (``result.operation``: inputs with
    their hashes, weights and parameters). The hashes the writer computed are reused.
    """
    hashes = Deferred(lambda: result.hashes)  # the whole file's hash (a pass over its bytes) while it is fingerprinted
    with Catalog(home) as catalog:
        return catalog.register_output(result.path, result.operation or OperationRecord("write"), hashes=hashes,
                                       name=name, samples=samples)


def attach_samples(images: Iterable[str | os.PathLike], uses: Iterable[Any], home: str | os.PathLike | None = None,
                   *, source: str = "generate") -> list[tuple[Entry, int, bool]]:
    """Attach images rendered with adapters to the catalog entry of every adapter used.

    ``uses`` are :class:`loralib.generation.AdapterUse` (path, weight, A1111 hash); each image's
    prompt, seed, settings and the adapter's weight are read from its A1111 parameters. An adapter
    not yet in the catalog is added. Returns, per adapter, its entry, how many images it gained
    and whether the entry is new. Shared by ``lorareg generate`` and the playground's previews.
    """
    from .samples import sample_record

    images = list(images)
    attached = []
    if not images:
        return attached
    with Catalog(home) as catalog:
        for use in uses:
            if use.path is None:
                continue
            entry = catalog.by_path(use.path)
            added = entry is None
            if added:
                entry = catalog.add(use.path).entry
            records = [sample_record(image, a1111_hash=use.a1111_hash, weight=use.weight, source=source)
                       for image in images]
            attached.append((catalog.add_samples(entry, records), len(records), added))
    return attached
