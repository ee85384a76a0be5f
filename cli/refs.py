"""How commands find their inputs and record their outputs.

An adapter argument may be a path, a catalog name, a hash prefix or a Hub repo id; outputs of
commands that make adapters are recorded in the catalog with their parents. Both go through the
registry, which imports neither torch nor diffusers.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import click

from loralib.errors import LoraError

if TYPE_CHECKING:
    from loralib.formats.base import SaveResult


def catalog_home(ctx: click.Context | None) -> str | None:
    """The catalog folder chosen with ``--home`` / ``LORAREG_HOME`` (None: the default)."""
    root = ctx.find_root() if ctx is not None else None
    return (root.obj or {}).get("home") if root is not None and isinstance(root.obj, dict) else None


def resolve_adapter(ctx: click.Context, reference: str) -> Path:
    """The local path of an adapter reference: an existing file or folder first, then a catalog
    name, a hash prefix (tensor SHA-256/A1111, file SHA-256/AutoV2, legacy), then a Hub repo id
    ``user/repo[@rev]`` (downloaded into the Hub cache, verified and registered)."""
    path = Path(reference).expanduser()
    if path.exists():  # the common case, without opening the catalog
        return path
    from lorareg.registry.resolve import resolve

    return resolve(reference, catalog_home(ctx))


def register_output(ctx: click.Context, result: SaveResult) -> None:
    """Record a written adapter (a loralib ``SaveResult``) and its lineage in the catalog.

    The operation that made it is the record the writer stored in the file (``result.operation``).
    The output exists whatever happens here, so a catalog problem is reported as a warning and
    does not fail the command.
    """
    from lorareg.registry.outputs import record_output

    from .output import note

    try:
        added = record_output(result, catalog_home(ctx))
    except (LoraError, OSError) as exc:
        note(f"warning: {result.path} was written but could not be recorded in the catalog: {exc}")
        return
    verb = "registered as" if added.created else "already in the catalog as"
    note(f"{verb} {added.entry.name} (see: lorareg show {shlex.quote(added.entry.name)})")
