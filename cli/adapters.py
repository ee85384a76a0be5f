"""``lorareg inspect`` and ``lorareg convert``."""

from __future__ import annotations

from pathlib import Path

import click

from loralib.dtypes import storage_dtype
from loralib.vocabulary import STORAGE_DTYPES, WRITE_FORMATS

from .output import human_size, note, print_json
from .refs import register_output, resolve_adapter


@click.command("inspect")
@click.argument("adapter")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-hash", is_flag=True, help="Skip hashing the file (faster on huge files).")
@click.option("--metadata", "-m", "show_metadata", is_flag=True, help="Show every metadata entry.")
@click.pass_context
def inspect_command(ctx: click.Context, adapter: str, as_json: bool, no_hash: bool, show_metadata: bool) -> None:
    """Describe ADAPTER from its header: format, architecture, modules, ranks, alphas, dtype, hashes, metadata.

    No tensor is loaded. Damaged files are described and flagged, with exit code 1.

    \b
    Examples:
      lorareg inspect my_lora.safetensors
      lorareg inspect peft_dir/ --json
    """
    from loralib.inspection import inspect

    report = inspect(resolve_adapter(ctx, adapter), hashes=not no_hash)
    if as_json:
        print_json(report.to_dict())
    else:
        _print_report(report, show_metadata)
    if report.damaged:
        ctx.exit(1)


def _counts(counts: dict, unit: str = "") -> str:
    if not counts:
        return "—"
    from loralib.inspection import format_number

    parts = [f"{format_number(k)}{unit} ×{v}" for k, v in counts.items()]
    return ", ".join(parts) if len(parts) <= 6 else f"{', '.join(parts[:6])}, … ({len(parts)} values)"


def _print_report(report, show_metadata: bool) -> None:
    from rich.table import Table

    from loralib.inspection import architecture_title, metadata_summary

    from .output import console

    out = console()
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("file", report.path)
    table.add_row("format", f"{report.format_title} [dim]({report.format})[/]")
    table.add_row("architecture", f"{architecture_title(report.architecture)} [dim]({report.architecture_evidence})[/]")
    if report.metadata_claims:
        table.add_row("metadata says", report.metadata_claims)
    components = ", ".join(f"{c} {n}" for c, n in report.components.items())
    table.add_row("modules", f"{report.modules}" + (f" ({components})" if components else ""))
    if report.plain_lora:
        table.add_row("module kinds", f"linear {report.linear_modules}, conv {report.conv_modules}"
                      + (f" (CP-decomposed {report.cp_modules})" if report.cp_modules else ""))
        table.add_row("ranks", _counts(report.ranks))
        table.add_row("alphas", _counts(report.alphas))
    table.add_row("dtype", _counts(report.dtypes))
    table.add_row("size", f"{human_size(report.file_size)}, {report.tensors} tensors, {report.parameters:,} values")
    if report.embeddings:
        table.add_row("embeddings", ", ".join(report.embeddings))
    for name in ("sha256", "autov2", "tensor_sha256", "a1111", "legacy"):
        if name in report.hashes:
            label = {"tensor_sha256": "tensor sha256", "a1111": "A1111 hash", "autov2": "AutoV2",
                     "legacy": "legacy hash"}.get(name, name)
            table.add_row(label, report.hashes[name])
    shown = report.metadata if show_metadata else metadata_summary(report.metadata)
    for key, value in shown.items():
        table.add_row(f"[dim]{key}[/]", value if len(value) < 300 or show_metadata else value[:297] + "…")
    if not show_metadata and len(report.metadata) > len(shown):
        table.add_row("[dim]metadata[/]", f"[dim]{len(report.metadata)} entries (show all with --metadata)[/]")
    out.print(table)
    for line in report.notes:
        out.print(f"[yellow]note:[/] {line}")
    for line in report.problems:
        out.print(f"[bold red]damaged:[/] {line}")


def default_output(source: Path, fmt: str) -> Path:
    """Where ``convert`` writes when no -o is given: beside the source, named for the format."""
    stem = source.stem if source.is_file() else source.name
    if fmt == "peft":
        return source.parent / f"{stem}_peft"
    return source.parent / f"{stem}_{fmt}.safetensors"


@click.command("convert")
@click.argument("adapter")
@click.option("--to", "fmt", type=click.Choice(WRITE_FORMATS), default="kohya", show_default=True,
              help="Output format.")
@click.option("-o", "--output", type=click.Path(), help="Output file (kohya, diffusers) or folder (peft, diffusers).")
@click.option("--dtype", type=click.Choice(sorted(STORAGE_DTYPES)), help="Store factors in this dtype (default: as read).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--drop-embeddings", is_flag=True, help="Leave out textual-inversion tokens the output format cannot hold.")
@click.option("--allow-pickle", is_flag=True, help="Read .ckpt/.pt/.bin files (unpickling runs code from the file).")
@click.option("--rank", type=click.IntRange(min=1), help="Rank of the layers the output fuses (Flux/SD3 qkv, Flux "
              "linear1): the optimal rank-N approximation; default exact (rank up to the sum of the parts' ranks).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def convert_command(ctx: click.Context, adapter: str, fmt: str, output: str | None, dtype: str | None, force: bool,
                    drop_embeddings: bool, allow_pickle: bool, rank: int | None, as_json: bool) -> None:
    """Convert ADAPTER to kohya (default), PEFT, diffusers or ComfyUI format; every module's ΔW is unchanged.

    Reads every spelling (kohya, PEFT, diffusers, ComfyUI/BFL, OneTrainer, OMI, XLabs, cloneofsimo)
    of SD1.x, SD2.x, SDXL, Flux.1 and SD3/SD3.5 adapters.

    \b
    Examples:
      lorareg convert my_lora.safetensors --to peft -o out_dir/
      lorareg convert pytorch_lora_weights.safetensors --to kohya -o my_lora.safetensors
      lorareg convert x.safetensors --to diffusers -o pytorch_lora_weights.safetensors
      lorareg convert flux_diffusers.safetensors --to kohya --rank 32 -o flux_kohya.safetensors
    """
    from loralib.formats import convert

    source = resolve_adapter(ctx, adapter)
    target = Path(output) if output else default_output(source, fmt)
    result = convert(source, target, fmt, force=force, dtype=storage_dtype(dtype) if dtype else None,
                     drop_embeddings=drop_embeddings, allow_pickle=allow_pickle, fused_rank=rank)
    register_output(ctx, result)
    if as_json:
        print_json({"output": str(result.path), "format": result.format, "files": [str(f) for f in result.files],
                    "hashes": result.hashes.to_dict(), "notes": result.notes})
        return
    for line in result.notes:
        note(line)
    click.echo(f"wrote {result.format} adapter to {result.path}" + (
        f" (+{len(result.files) - 1} more files)" if len(result.files) > 1 else ""))
    click.echo(f"  A1111 hash {result.hashes.a1111}  AutoV2 {result.hashes.autov2}")
