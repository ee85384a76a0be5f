"""Catalog commands: ``add``, ``scan``, ``list``, ``search``, ``show``, ``tag``, ``rm``, ``verify``, ``lineage``,
``duplicates``.

None of them imports torch, diffusers or peft: headers are read by ``loralib.inspect`` and the
database is SQLite.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

import click

from loralib.units import human_size
from loralib.vocabulary import CATALOG_SORTS

from .output import console, note, plain, print_json, progress, shown
from .refs import catalog_home, complete_names


def _open(ctx: click.Context):
    from lorareg.registry.catalog import Catalog

    return Catalog(catalog_home(ctx))


def _one_line(entry) -> str:
    parts = [entry.architecture or "?", entry.format or "?", f"rank {entry.rank_text}", f"{entry.modules} modules"]
    return plain(f"{entry.name} ({', '.join(parts)}), A1111 hash {entry.tensor_sha256[:12]}")


# -- add ----------------------------------------------------------------------------------------- #

@click.command("add")
@click.argument("paths", nargs=-1, required=True)
@click.option("--name", help="Catalog name (one adapter only; default: the file's name).")
@click.option("--rename", is_flag=True, help="With --name: rename the entry when the adapter is already in the catalog "
                                             "under another name (without it, that is refused).")
@click.option("--tag", "tags", multiple=True, help="A tag (repeatable).")
@click.option("--trigger", "triggers", multiple=True, help="A trigger word or phrase (repeatable).")
@click.option("--description", help="A description (searchable).")
@click.option("--sample", "samples", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A sample image (PNG, JPEG, WebP or GIF) made with the adapter (repeatable; its prompt, seed and "
                   "settings are read from the PNG's A1111 parameters).")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@click.pass_context
def add_command(ctx: click.Context, paths: tuple[str, ...], name: str | None, rename: bool, tags: tuple[str, ...],
                triggers: tuple[str, ...], description: str | None, samples: tuple[str, ...], as_json: bool) -> None:
    """Add adapter files (or PEFT/diffusers folders) to the catalog, from their headers and hashes.

    An adapter already in the catalog (the same tensors under the same names, even with other
    metadata) gains the new path, tags and trigger words instead of a second entry; --name does
    not rename it unless --rename is given.

    \b
    Examples:
      lorareg add my_lora.safetensors --name pixel-art --tag style --trigger "pxl style"
      lorareg add loras/*.safetensors --tag sdxl
      lorareg add my_lora.safetensors --name better-name --rename
    """
    from loralib.errors import InvalidArgumentError
    from lorareg.registry.samples import sample_record

    if name and len(paths) > 1:
        raise InvalidArgumentError("--name gives one adapter a name, but several paths were given",
                                   "Add them one at a time to name them")
    if rename and not name:
        raise InvalidArgumentError("--rename renames to the name given with --name, and no --name was given")
    records = [sample_record(s) for s in samples]
    results = []
    with _open(ctx) as catalog:
        for path in paths:
            results.append(catalog.add(path, name=name, tags=tags, triggers=triggers, description=description,
                                       samples=records, rename=rename))
    if as_json:
        print_json([{**r.entry.to_dict(), "new": r.created, "renamed_from": r.renamed_from} for r in results])
        return
    for r in results:
        if r.created:
            click.echo(f"added {_one_line(r.entry)}")
        else:
            click.echo(f"already in the catalog: {_one_line(r.entry)}" + (" (new path recorded)" if r.new_path else ""))
        if r.renamed_from:
            click.echo(f"  renamed {r.renamed_from} to {r.entry.name}")
        if r.entry.damaged:
            note(f"damaged: {'; '.join(r.entry.problems)}")


# -- scan ---------------------------------------------------------------------------------------- #

@contextmanager
def _terminate_as_interrupt():
    """Let ``kill`` (SIGTERM) stop a scan the way Ctrl-C does, so the work done so far is saved."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("scan")
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--no-recursive", is_flag=True, help="Only the folder itself, not its subfolders.")
@click.option("--follow-links", is_flag=True,
              help="Also follow links to folders outside the scanned one (never to / or to a folder containing it).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Processes that read the files (1: the scanning process alone; default: one per free core "
                   "when there are a few hundred files to read).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def scan_command(ctx: click.Context, folders: tuple[str, ...], no_recursive: bool, follow_links: bool,
                 workers: int | None, as_json: bool) -> None:
    """Index every adapter in FOLDERS in place (headers and hashes only), incrementally.

    Files unchanged since the last scan (same size and mtime) are skipped without being read.
    Interrupt it any time (Ctrl-C, kill): what was read is saved, and the next scan goes on from
    there. Files that are not LoRAs are counted and skipped; damaged ones are flagged. Links to
    folders are followed once (loops are reported), and outside FOLDERS only with --follow-links.

    \b
    Examples:
      lorareg scan ~/stable-diffusion-webui/models/Lora
      lorareg scan ComfyUI/models/loras --json
      lorareg scan /data/loras --workers 2
    """
    from lorareg.registry.scan import ScanInterrupted, scan

    reports = []
    with _open(ctx) as catalog, _terminate_as_interrupt():
        for folder in folders:
            try:
                with progress(f"scanning {folder}", enabled=not as_json and sys.stderr.isatty()) as update:
                    reports.append(scan(catalog, folder, recursive=not no_recursive, progress=update,
                                        follow_links=follow_links, workers=workers))
            except ScanInterrupted as stop:
                _print_scan(stop.report)
                click.echo(f"interrupted: {stop.report.indexed} files were read and saved; "
                           "run the same scan again to finish", err=True)
                ctx.exit(130)
    if as_json:
        print_json([r.to_dict() for r in reports] if len(reports) > 1 else reports[0].to_dict())
        return
    for report in reports:
        _print_scan(report)


def _print_scan(report) -> None:
    rate = f", {report.found / report.seconds:,.0f} files/s" if report.seconds > 0 and report.found else ""
    click.echo(f"{plain(report.folder)}: {report.found} files in {report.seconds:.1f} s{rate}")
    click.echo(f"  {report.added} added, {report.updated} updated, {report.extra_paths} copies of known adapters, "
               f"{report.unchanged} unchanged")
    for label, paths in (("not a LoRA (skipped)", report.not_lora), ("damaged (flagged)", report.damaged),
                         ("pickle files (not opened)", report.pickles), ("gone since the last scan", report.missing)):
        if paths:
            click.echo(f"  {len(paths)} {label}: " + ", ".join(plain(p.rsplit("/", 1)[-1]) for p in paths[:5])
                       + (", …" if len(paths) > 5 else ""))
    for item in report.skipped[:5]:
        click.echo(f"  skipped {plain(item['path'])}: {plain(item['reason'])}")
    if len(report.skipped) > 5:
        click.echo(f"  … and {len(report.skipped) - 5} more skipped (see --json)")


# -- list and search ----------------------------------------------------------------------------- #

def _known(kind: str, vocabulary_list: str):
    """A click callback accepting one word of ``loralib.vocabulary``'s list ``vocabulary_list`` (any
    case; looked up only when the option is given), and otherwise naming the nearest ones."""
    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        from loralib import vocabulary

        values = getattr(vocabulary, vocabulary_list)
        if value.lower() in values:
            return value.lower()
        import difflib

        from loralib.errors import InvalidArgumentError

        close = difflib.get_close_matches(value.lower(), values, n=1, cutoff=0.5)
        hint = f"Did you mean {close[0]}?" if close else ""
        raise InvalidArgumentError(f"unknown {kind} {value!r} for {param.opts[0]}",
                                   f"{hint} The {kind}s are: {', '.join(values)}".strip())
    return check


_FILTERS = [
    click.option("--arch", "architecture", callback=_known("architecture", "KNOWN_ARCHITECTURES"),
                 help="Only this architecture (sd1, sd2, sdxl, flux…)."),
    click.option("--format", "fmt", callback=_known("format", "CATALOG_FORMATS"),
                 help="Only this format (kohya, peft, diffusers…, or a kind such as lycoris-lokr)."),
    click.option("--tag", help="Only adapters with this tag."),
    click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True, help="At most this many (0: all)."),
    click.option("--json", "as_json", is_flag=True, help="Print JSON."),
]


def _filters(function):
    for option in reversed(_FILTERS):
        function = option(function)
    return function


TABLE_COLUMNS = (("name", "cyan"), ("arch", None), ("format", None), ("rank", None), ("modules", None),
                 ("size", None), ("tags", "green"), ("A1111", "bright_black"))
_RIGHT = {"rank", "modules", "size"}


def _table(entries) -> None:
    """Entries as an aligned table on stdout, colored on a terminal.

    Written by hand rather than with rich's Table, which spends about 3 ms per row measuring
    cells: ``list`` and ``search`` must stay well under half a second as whole commands.
    """
    import shutil

    from rich.cells import cell_len

    rows = [[plain(e.name) + (" (damaged)" if e.damaged else ""), plain(e.architecture or "?"), plain(e.format or "?"),
             e.rank_text, str(e.modules or 0), human_size(e.size or 0), plain(", ".join(e.tags)), e.tensor_sha256[:12]]
            for e in entries]
    headers = [name for name, _ in TABLE_COLUMNS]
    widths = [max(cell_len(str(v)) for v in column) for column in zip(headers, *rows)]
    room = shutil.get_terminal_size((120, 24)).columns - 2 * (len(widths) - 1)
    for index in (6, 0):  # shrink tags, then names, to fit the terminal
        excess = sum(widths) - room
        if excess > 0:
            widths[index] = max(8, widths[index] - excess)
    colored = sys.stdout.isatty()
    for number, row in enumerate([headers, *rows]):
        cells = []
        for (label, color), width, value in zip(TABLE_COLUMNS, widths, row):
            text = _fit(str(value), width, cell_len)
            pad = " " * (width - cell_len(text))
            text = pad + text if label in _RIGHT else text + pad
            if colored:
                text = click.style(text, bold=number == 0 or label == "name", fg=None if number == 0 else color)
            cells.append(text)
        click.echo("  ".join(cells).rstrip())


def _fit(text: str, width: int, cell_len) -> str:
    """``text`` cut to ``width`` terminal cells, with an ellipsis when cut."""
    if cell_len(text) <= width:
        return text
    while text and cell_len(text) > width - 1:
        text = text[:-1]
    return text + "…"


def _hint(message: str) -> None:
    """A dim line on stderr. ``output.note`` would import rich's console (tens of ms) into list and search."""
    click.echo(click.style(message, dim=True) if sys.stderr.isatty() else message, err=True)


def _escape(text: str) -> str:
    return shown(text)


@click.command("list")
@_filters
@click.option("--sort", type=click.Choice(CATALOG_SORTS), default="name", show_default=True)
@click.pass_context
def list_command(ctx: click.Context, architecture, fmt, tag, limit: int, as_json: bool, sort: str) -> None:
    """List the adapters in the catalog.

    \b
    Examples:
      lorareg list
      lorareg list --arch sdxl --format kohya --tag style
      lorareg list --sort added --limit 20 --json
    """
    with _open(ctx) as catalog:
        entries = catalog.list(architecture=architecture, format=fmt, tag=tag, sort=sort, limit=limit or None)
        total = catalog.count(architecture=architecture, format=fmt, tag=tag) if len(entries) == limit else len(entries)
    if as_json:
        print_json([e.summary() for e in entries])
    elif entries:
        _table(entries)
    else:
        _hint("no adapters match" if architecture or fmt or tag else "the catalog is empty: add adapters with "
             "`lorareg add FILE` or `lorareg scan FOLDER`")
    if total > len(entries):
        _hint(f"showing {len(entries)} of {total:,}; use --limit 0 for all")


@click.command("search")
@click.argument("query")
@_filters
@click.pass_context
def search_command(ctx: click.Context, query: str, architecture, fmt, tag, limit: int, as_json: bool) -> None:
    """Full-text search over names, titles, tags, trigger words, descriptions, metadata and Hub repos.

    Plain words match as prefixes and all must match. FTS5 syntax works too: "exact phrase",
    prefix*, OR, NOT, NEAR(a b), and column filters such as tags:style, triggers:pxl or keywords:dreamshaper.

    \b
    Examples:
      lorareg search pixel
      lorareg search 'tags:style NOT anime' --arch sdxl
    """
    with _open(ctx) as catalog:
        entries, total = catalog.search(query, architecture=architecture, format=fmt, tag=tag, limit=limit or None)
    if as_json:
        print_json([e.summary() for e in entries])
    elif entries:
        _table(entries)
    else:
        _hint(f"nothing matches {plain(repr(query))}")
    if total > len(entries):
        _hint(f"showing the best {len(entries)} of {total:,} matches; use --limit 0 for all")


# -- show and lineage ---------------------------------------------------------------------------- #

@click.command("show")
@click.argument("reference", shell_complete=complete_names)
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--metadata", "-m", "show_metadata", is_flag=True, help="Show every metadata entry.")
@click.pass_context
def show_command(ctx: click.Context, reference: str, as_json: bool, show_metadata: bool) -> None:
    """Everything the catalog knows about an adapter: hashes, files, source, tags, triggers, lineage.

    REFERENCE is a catalog name, a hash prefix (at least 8 hex digits) or a path.

    \b
    Examples:
      lorareg show pixel-art
      lorareg show 1a2b3c4d5e6f --json
    """
    from lorareg.registry.lineage import lineage

    with _open(ctx) as catalog:
        entry = catalog.get(reference)
        files, parents, children = catalog.files(entry), catalog.parents(entry), catalog.children(entry)
        same = catalog.same_adapter(entry)
        tree = lineage(catalog, entry)
    if as_json:
        print_json({**entry.to_dict(), "files": [f.to_dict() for f in files], "parents": [p.to_dict() for p in parents],
                    "children": [c.name for c in children], "lineage": tree.to_dict(),
                    "same_adapter_as": [{"name": e.name, "format": e.format, "dtype": e.dtype,
                                         "similarity": round(similarity, 6)} for e, similarity in same]})
        return
    _print_entry(entry, files, children, tree, show_metadata, same)


def _sample_line(sample: dict) -> str:
    """A sample image for ``show``: path, then prompt, seed, weight and the main settings."""
    details = []
    if sample.get("prompt"):
        details.append(repr(sample["prompt"]))
    settings = sample.get("parameters") or {}
    for label, value in (("seed", sample.get("seed")), ("weight", sample.get("weight")),
                         ("steps", settings.get("Steps")), ("sampler", settings.get("Sampler")),
                         ("CFG", settings.get("CFG scale")), ("size", settings.get("Size"))):
        if value not in (None, ""):
            details.append(f"{label} {value}")
    return f"{sample.get('path')}" + (f" — {', '.join(details)}" if details else "")


def _print_entry(entry, files, children, tree, show_metadata: bool, same=()) -> None:
    from rich.table import Table

    from loralib.inspection import architecture_title, format_title, metadata_summary
    from lorareg.registry.lineage import operation_summary, render

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    row = lambda label, value: table.add_row(label, _escape(str(value)))  # noqa: E731
    row("name", entry.name)
    if entry.title and entry.title != entry.name:
        row("title", entry.title)
    if entry.description:
        row("description", entry.description)
    row("architecture", f"{architecture_title(entry.architecture or 'unknown')} ({entry.architecture})")
    row("format", f"{format_title(entry.format)} ({entry.format})" if entry.format else "—")
    row("modules", f"{entry.modules} (" + ", ".join(f"{k} {v}" for k, v in entry.components.items()) + ")")
    row("ranks", ", ".join(f"{k} ×{v}" for k, v in entry.ranks.items()) or "—")
    row("alphas", ", ".join(f"{k} ×{v}" for k, v in entry.alphas.items()) or "—")
    row("dtype", entry.dtype or "—")
    row("size", f"{human_size(entry.size or 0)}, {entry.tensors} tensors, {entry.parameters or 0:,} values")
    row("tags", ", ".join(entry.tags) or "—")
    row("trigger words", ", ".join(entry.triggers) or "—")
    if same:
        row("same adapter as", ", ".join(f"{e.name} ({e.format}, {e.dtype})" for e, _ in same))
    labels = {"sha256": "sha256", "autov2": "AutoV2", "tensor_sha256": "tensor sha256 (AutoV3)", "a1111": "A1111 hash",
              "legacy": "legacy hash"}
    for key, label in labels.items():
        if key in entry.hashes:
            row(label, entry.hashes[key])
    commit = (entry.source_commit or "")[:12]
    source = {"hub": f"Hub {entry.source_repo} @ {entry.source_revision} ({commit}), {entry.source_file}",
              "output": f"written by lorareg {(entry.operation or {}).get('operation', '')}".rstrip()}
    row("source", source.get(entry.source or "", "local file"))
    if entry.operation:
        params = {k: v for k, v in entry.operation.items() if k not in ("operation", "inputs")}
        row("made by", operation_summary(entry.operation.get("operation"), params))
    for record in entry.hub:
        row("pushed to", f"{record.get('repo')} ({str(record.get('commit', ''))[:12]}, {record.get('date', '')})")
    for sample in entry.samples:
        row("sample", _sample_line(sample))
    for f in files:
        state = "" if f.state == "ok" else f" [{f.state}]"
        row("file", f"{f.path}{state}")
    if children:
        row("used by", ", ".join(c.name for c in children))
    row("added", f"{entry.added_at} (updated {entry.updated_at})")
    shown = entry.metadata if show_metadata else metadata_summary(entry.metadata)
    for key, value in shown.items():
        table.add_row(f"[dim]{_escape(key)}[/]", _escape(value if show_metadata or len(value) < 300 else value[:297] + "…"))
    out = console()
    out.print(table)
    if entry.problems:
        for problem in entry.problems:
            out.print(f"[bold red]damaged:[/] {_escape(problem)}")
    if tree.parents:
        out.print("[bold]lineage[/]")
        for line in render(tree):
            out.print("  " + _escape(line))


@click.command("lineage")
@click.argument("reference", shell_complete=complete_names)
@click.option("--depth", type=click.IntRange(min=1), default=32, show_default=True, help="How many generations back.")
@click.option("--json", "as_json", is_flag=True, help="Print the tree as nested JSON.")
@click.pass_context
def lineage_command(ctx: click.Context, reference: str, depth: int, as_json: bool) -> None:
    """The tree of operations (merge, resize, convert, train…) an adapter came from, with weights.

    Parents are matched by identity (tensor hash for files written before lorareg recorded it):
    those in the catalog are followed through their own entries, the others through the history
    each file carries in its metadata.

    \b
    Example:
      lorareg lineage abc-merged
    """
    from lorareg.registry.lineage import lineage, render

    with _open(ctx) as catalog:
        tree = lineage(catalog, catalog.get(reference), max_depth=depth)
    if as_json:
        print_json(tree.to_dict())
        return
    for line in render(tree):
        click.echo(plain(line))
    if not tree.parents:
        note("no recorded parents: it was not made by a lorareg operation, or its inputs were not recorded")


# -- tag, rm, verify ----------------------------------------------------------------------------- #

# -h is not help here: "-photo" removes the tag "photo" (click would read it as -p -h -o -t -o).
@click.command("tag", context_settings={"ignore_unknown_options": True, "help_option_names": ["--help"]})
@click.argument("reference", shell_complete=complete_names)
@click.argument("changes", nargs=-1, type=click.UNPROCESSED)
@click.option("--json", "as_json", is_flag=True, help="Print the entry's tags as JSON.")
@click.pass_context
def tag_command(ctx: click.Context, reference: str, changes: tuple[str, ...], as_json: bool) -> None:
    """Add (+tag or tag) and remove (-tag) tags; with no changes, print the tags.

    Any word starting with - removes that tag (-h too: help is --help here).

    \b
    Examples:
      lorareg tag pixel-art +anime -style
      lorareg tag pixel-art "+pixel art" -photo
    """
    add = [c[1:] if c.startswith("+") else c for c in changes if not c.startswith("-")]
    remove = [c[1:] for c in changes if c.startswith("-")]
    with _open(ctx) as catalog:
        entry = catalog.tag(reference, add, remove) if changes else catalog.get(reference)
    if as_json:
        print_json({"name": entry.name, "tags": entry.tags})
    else:
        click.echo(plain(f"{entry.name}: " + (", ".join(entry.tags) or "(no tags)")))


@click.command("rm")
@click.argument("references", nargs=-1, required=True, shell_complete=complete_names)
@click.option("--delete-file", is_flag=True, help="Also delete the adapter's files from disk.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting files.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
@click.pass_context
def rm_command(ctx: click.Context, references: tuple[str, ...], delete_file: bool, yes: bool, as_json: bool) -> None:
    """Remove adapters from the catalog. Files stay on disk unless --delete-file is given.

    \b
    Examples:
      lorareg rm pixel-art
      lorareg rm old-lora --delete-file --yes
    """
    removed = []
    with _open(ctx) as catalog:
        for reference in references:
            entry = catalog.get(reference)
            if delete_file and not yes:
                paths = ", ".join(f.path for f in catalog.files(entry)) or "no files"
                click.confirm(plain(f"remove {entry.name} and delete {paths}?"), abort=True, err=True)
            removed.append(catalog.remove(reference, delete_files=delete_file))
    if as_json:
        print_json([{"name": r.entry.name, "deleted": r.deleted, "kept": r.kept} for r in removed])
        return
    for r in removed:
        click.echo(plain(f"removed {r.entry.name} from the catalog" + (f"; deleted {', '.join(r.deleted)}" if r.deleted
                                                                       else "; its files were kept")))
        for path in r.kept:
            note(f"kept {path}: its content changed since it was catalogued, so it is not the adapter that was removed")


@click.command("verify")
@click.argument("references", nargs=-1, shell_complete=complete_names)
@click.option("--search", "folders", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Look for moved files in this folder (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify_command(ctx: click.Context, references: tuple[str, ...], folders: tuple[str, ...], as_json: bool) -> None:
    """Re-hash every file the catalog records and report missing, moved and changed ones.

    Exits with 1 when a file is missing, changed or unreadable. Metadata-only edits are the same
    adapter (same tensors) and are recorded; moved files found in --search folders are too.

    \b
    Examples:
      lorareg verify
      lorareg verify pixel-art --search ~/Downloads
    """
    from lorareg.registry.verify import verify

    with _open(ctx) as catalog, progress("verifying", enabled=not as_json and sys.stderr.isatty()) as update:
        report = verify(catalog, references, search=folders, progress=update)
    if as_json:
        print_json(report.to_dict())
    else:
        counts = report.to_dict()
        click.echo(f"checked {counts['checked']} files: {counts['ok']} ok, {counts['metadata-changed']} with edited "
                   f"metadata, {counts['moved']} moved, {counts['changed']} changed, {counts['missing']} missing, "
                   f"{counts['unreadable']} unreadable")
        for item in report.items:
            if item.status != "ok":
                where = f" → {item.new_path}" if item.new_path else ""
                click.echo(plain(f"  {item.status:<16} {item.name}: {item.path}{where} ({item.detail})"))
        for path in report.leftovers:
            click.echo(f"  leftover         {plain(path)} (a temporary of an interrupted write; safe to delete)")
    if report.problems:
        ctx.exit(1)



# -- duplicates ------------------------------------------------------------------------------------ #

@click.command("duplicates")
@click.option("--near", type=click.FloatRange(0.0, 1.0), default=0.8, show_default=True,
              help="Report entries whose ΔW cosine is at least this as near-duplicates.")
@click.option("--json", "as_json", is_flag=True, help="Print every group as JSON.")
@click.pass_context
def duplicates_command(ctx: click.Context, near: float, as_json: bool) -> None:
    """Byte-identical copies, the same adapter in other formats or dtypes, and near-duplicates.

    Adapters are compared by a fingerprint of their ΔW (the same whatever the format, key names,
    dtype or factors): "same" means the same ΔW up to rounding (cosine ≥ 0.9999, norms within 1 %),
    "near" a cosine of at least --near (a rank reduction, a merge dominated by one adapter). Two
    unrelated adapters have a cosine near 0.

    \b
    Examples:
      lorareg duplicates
      lorareg duplicates --near 0.9 --json
    """
    from lorareg.registry.duplicates import find_duplicates

    with _open(ctx) as catalog, progress("comparing", enabled=not as_json) as update:
        report = find_duplicates(catalog, near=near, progress=update)
    if as_json:
        print_json(report.to_dict())
        return
    _print_duplicates(report)


def _member(m) -> str:
    return f"{m.name} ({m.format}, {m.dtype}, rank {m.rank})"


def _print_duplicates(report) -> None:
    out = console()
    shown = False
    if report.copies:
        shown = True
        out.print("[bold]byte-identical copies[/] (same SHA-256)")
        for group in report.copies:
            name = group["files"][0]["name"]
            out.print(f"  {_escape(name or '?')}: " + ", ".join(_escape(f["path"]) for f in group["files"]))
    if report.variants:
        shown = True
        out.print("[bold]the same tensors with other metadata[/] (one entry, several files)")
        for group in report.variants:
            out.print(f"  {_escape(group['name'])}: " + ", ".join(_escape(f["path"]) for f in group["files"]))
    if report.same:
        shown = True
        out.print("[bold]the same adapter in other formats, dtypes or factors[/] (ΔW equal up to rounding)")
        for group in report.same:
            out.print("  " + " = ".join(_escape(_member(m)) for m in group))
    if report.near:
        shown = True
        out.print(f"[bold]near-duplicates[/] (ΔW cosine ≥ {report.near_threshold:g})")
        for group in report.near:
            for pair in group["pairs"]:
                out.print(f"  {_escape(pair['a'])} ~ {_escape(pair['b'])}: similarity {pair['similarity']:.3f}, "
                          f"norm ratio {pair['norm_ratio']:.2f}")
    if not shown:
        click.echo(f"no duplicates among {report.compared} fingerprinted adapters")
    missing = sum(report.without_fingerprint.values())
    if missing:
        reasons = "; ".join(f"{n} {reason}" for reason, n in list(report.without_fingerprint.items())[:4])
        what = "1 entry has" if missing == 1 else f"{missing} entries have"
        note(f"{what} no fingerprint and could not be compared ({reasons})")
