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


def _completion_home(ctx: click.Context) -> str | None:
    """The catalog folder while completing: --home given earlier on the line, else $LORAREG_HOME."""
    root = ctx.find_root()
    return root.params.get("home") if root is not None else None


def complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Shell completion of catalog names (``_LORAREG_COMPLETE=bash_source lorareg``; see docs/cli.md)."""
    from click.shell_completion import CompletionItem

    from lorareg.registry.catalog import complete_names as names

    return [CompletionItem(name) for name in names(incomplete, _completion_home(ctx))]


def complete_adapters(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Shell completion of an adapter argument: catalog names, else file names."""
    from click.shell_completion import CompletionItem

    return [CompletionItem(incomplete, type="file"), *complete_names(ctx, param, incomplete)]


def resolve_adapter(ctx: click.Context, reference: str) -> Path:
    """The local path of an adapter reference: an existing file or folder first, then a catalog
    name, a hash prefix (tensor SHA-256/A1111, file SHA-256/AutoV2, legacy), then a Hub repo id
    ``user/repo[@rev]`` (downloaded into the Hub cache, verified and registered)."""
    path = Path(reference).expanduser()
    if path.exists():  # the common case, without opening the catalog
        return path
    from lorareg.registry.resolve import resolve

    return resolve(reference, catalog_home(ctx))


def known_hashes(ctx: click.Context, path: Path):
    """The hashes the catalog holds for the adapter ``path`` while it is unchanged (None: hash it);
    see :func:`lorareg.registry.known.known_hashes`."""
    from lorareg.registry.known import known_hashes as recorded

    return recorded(path, catalog_home(ctx))


def load_input(ctx: click.Context, path: Path):
    """Load an operation's input adapter, with its hashes from the catalog when it holds them."""
    from loralib.formats import load_adapter

    return load_adapter(path, hashes=known_hashes(ctx, path))


def register_output(ctx: click.Context, result: SaveResult, samples: list[Path] = ()) -> None:
    """Record a written adapter (a loralib ``SaveResult``) and its lineage in the catalog, with the
    sample images made with it.

    The operation that made it is the record the writer stored in the file (``result.operation``).
    The output exists whatever happens here, so a catalog problem is reported as a warning and
    does not fail the command.
    """
    from lorareg.registry.outputs import record_output

    from .output import note

    try:
        added = record_output(result, catalog_home(ctx), samples=samples)
    except (LoraError, OSError) as exc:
        note(f"warning: {result.path} was written but could not be recorded in the catalog: {exc}")
        return
    verb = "registered as" if added.created else "already in the catalog as"
    note(f"{verb} {added.entry.name} (see: lorareg show {shlex.quote(added.entry.name)})")


def attach_samples(ctx: click.Context, images: list[Path], uses: list) -> None:
    """Attach generated images to the catalog entries of every adapter used (adding adapters not yet in it).

    ``uses`` are :class:`loralib.generation.AdapterUse`; see
    :func:`lorareg.registry.outputs.attach_samples`. A catalog problem is a warning: the images exist.
    """
    from lorareg.registry.outputs import attach_samples as attach

    from .output import note

    try:
        for entry, count, added in attach(images, uses, catalog_home(ctx)):
            if added:
                note(f"added {entry.name} to the catalog")
            note(f"attached {count} image{'s' if count != 1 else ''} to {entry.name} "
                 f"(see: lorareg show {shlex.quote(entry.name)})")
    except (LoraError, OSError) as exc:
        note(f"warning: the images were written but could not be attached in the catalog: {exc}")
