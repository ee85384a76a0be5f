"""``lorareg inspect`` and ``lorareg convert``."""

from __future__ import annotations

from pathlib import Path

import click

from loralib.dtypes import storage_dtype
from loralib.formats import input_files
from loralib.units import human_size
from loralib.vocabulary import DEVICES, STORAGE_DTYPES, SVD_METHODS, WRITE_FORMATS

from .output import note, plain, print_error, print_json, shown
from .paths import adapter_output, make_parents, refuse_existing
from .refs import complete_adapters, known_hashes, register_output, resolve_adapter


@click.command("inspect")
@click.argument("adapter", shell_complete=complete_adapters)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-hash", is_flag=True, help="Skip hashing the file (faster on huge files).")
@click.option("--metadata", "-m", "show_metadata", is_flag=True, help="Show every metadata entry.")
@click.option("--modules", "show_modules", is_flag=True, help="List every module with its kind (LoRA, LoHa, LoKr, …).")
@click.pass_context
def inspect_command(ctx: click.Context, adapter: str, as_json: bool, no_hash: bool, show_metadata: bool,
                    show_modules: bool) -> None:
    """Describe ADAPTER from its header: format, architecture, module kinds, ranks, alphas, dtype, hashes, metadata.

    No tensor is loaded. Damaged files are described and flagged, with exit code 1. LyCORIS files
    (LoHa, LoKr, full and norm differences) and DoRA are counted per kind.

    \b
    Examples:
      lorareg inspect my_lora.safetensors
      lorareg inspect peft_dir/ --json
      lorareg inspect my_lokr.safetensors --modules
    """
    from loralib.inspection import inspect

    report = inspect(resolve_adapter(ctx, adapter), hashes=not no_hash)
    if as_json:
        print_json(report.to_dict())
    else:
        _print_report(report, show_metadata, show_modules)
    if report.damaged:
        print_error(f"{report.path} is damaged: {'; '.join(report.problems)}")
        ctx.exit(1)


def _counts(counts: dict, unit: str = "") -> str:
    if not counts:
        return "—"
    from loralib.inspection import format_number

    parts = [f"{format_number(k)}{unit} ×{v}" for k, v in counts.items()]
    return ", ".join(parts) if len(parts) <= 6 else f"{', '.join(parts[:6])}, … ({len(parts)} values)"


def _print_report(report, show_metadata: bool, show_modules: bool = False) -> None:
    from rich.table import Table

    from loralib.inspection import architecture_title, metadata_summary

    from .output import console

    out = console()
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("file", shown(report.path))
    table.add_row("format", f"{report.format_title} [dim]({report.format})[/]")
    table.add_row("architecture", f"{architecture_title(report.architecture)} [dim]({shown(report.architecture_evidence)})[/]")
    if report.metadata_claims:
        table.add_row("metadata says", shown(report.metadata_claims))
    components = ", ".join(f"{c} {n}" for c, n in report.components.items())
    table.add_row("modules", f"{report.modules}" + (f" ({components})" if components else ""))
    if report.kinds:
        from loralib.lycoris import KIND_TITLES

        table.add_row("adapter kinds", ", ".join(f"{KIND_TITLES.get(k, k)} {n}" for k, n in report.kinds.items()))
        table.add_row("module kinds", f"linear {report.linear_modules}, conv {report.conv_modules}"
                      + (f" (CP-decomposed {report.cp_modules})" if report.cp_modules else ""))
        table.add_row("ranks", _counts(report.ranks))
        table.add_row("alphas", _counts(report.alphas))
    table.add_row("dtype", _counts(report.dtypes))
    table.add_row("size", f"{human_size(report.file_size)}, {report.tensors} tensors, {report.parameters:,} values")
    if report.embeddings:
        table.add_row("embeddings", shown(", ".join(report.embeddings)))
    for name in ("sha256", "autov2", "tensor_sha256", "a1111", "legacy"):
        if name in report.hashes:
            label = {"tensor_sha256": "tensor sha256", "a1111": "A1111 hash", "autov2": "AutoV2",
                     "legacy": "legacy hash"}.get(name, name)
            table.add_row(label, report.hashes[name])
    entries = report.metadata if show_metadata else metadata_summary(report.metadata)
    for key, value in entries.items():
        value = value if len(value) < 300 or show_metadata else value[:297] + "…"
        table.add_row(f"[dim]{shown(key)}[/]", shown(value))
    if not show_metadata and len(report.metadata) > len(entries):
        table.add_row("[dim]metadata[/]", f"[dim]{len(report.metadata)} entries (show all with --metadata)[/]")
    out.print(table)
    if show_modules and report.module_kinds:
        from loralib.lycoris import KIND_TITLES

        modules = Table(box=None, pad_edge=False)
        modules.add_column("module", style="cyan", overflow="fold")
        modules.add_column("kind")
        for key, kind in report.module_kinds.items():
            modules.add_row(key, KIND_TITLES.get(kind, kind))
        out.print(modules)
    for line in report.notes:
        out.print(f"[yellow]note:[/] {shown(line)}")
    for line in report.problems:
        out.print(f"[bold red]damaged:[/] {shown(line)}")


def default_output(source: Path, fmt: str) -> Path:
    """Where ``convert`` writes when no -o is given: beside the source, named for the format."""
    stem = source.stem if source.is_file() else source.name
    if fmt == "peft":
        return source.parent / f"{stem}_peft"
    return source.parent / f"{stem}_{fmt}.safetensors"


@click.command("convert")
@click.argument("adapter", shell_complete=complete_adapters)
@click.option("--to", "fmt", type=click.Choice(WRITE_FORMATS), default="kohya", show_default=True,
              help="Output format.")
@click.option("-o", "--output", type=click.Path(),
              help="Output file (kohya, diffusers) or folder (peft); a path ending in / is a folder to write into.")
@click.option("--plain", "as_plain", is_flag=True,
              help="Make a plain LoRA of a LyCORIS/DoRA adapter, exactly (LoHa and LoKr by their exact low-rank forms).")
@click.option("--rank", "-r", type=int,
              help="Make a plain LoRA of at most this rank per module: the best approximation of each ΔW (layers the "
                   "output fuses, Flux/SD3 qkv and Flux linear1 in kohya/ComfyUI names, are kept at this rank too).")
@click.option("--dynamic", metavar="RULE",
              help="Make a plain LoRA, choosing each module's rank: sv_fro:F, sv_ratio:N or sv_cumulative:F.")
@click.option("--max-rank", type=int, help="Cap on the rank a --dynamic rule may choose.")
@click.option("--base", type=click.Path(),
              help="Base model (diffusers folder or .safetensors checkpoint) for DoRA modules, whose ΔW depends on it.")
@click.option("--svd", type=click.Choice(SVD_METHODS), default="auto", show_default=True,
              help="With --rank: how full-rank differences and DoRA deltas are factorised.")
@click.option("--dtype", type=click.Choice(sorted(STORAGE_DTYPES)), help="Store factors in this dtype (default: as read).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--drop-embeddings", is_flag=True, help="Leave out textual-inversion tokens the output format cannot hold.")
@click.option("--allow-pickle", is_flag=True, help="Read .ckpt/.pt/.bin files (unpickling runs code from the file).")
@click.option("--allow-nonfinite", is_flag=True,
              help="Write factors holding NaN or infinite values (refused by default: they break every image).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="With --plain, --rank or --dynamic: compute on the CPU or a CUDA GPU (auto: the GPU when torch sees one).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (and the per-module report) as JSON.")
@click.pass_context
def convert_command(ctx: click.Context, adapter: str, fmt: str, output: str | None, as_plain: bool, rank: int | None,
                    dynamic: str | None, max_rank: int | None, base: str | None, svd: str, dtype: str | None,
                    force: bool, drop_embeddings: bool, allow_pickle: bool, allow_nonfinite: bool, device: str,
                    as_json: bool) -> None:
    """Convert ADAPTER to kohya (default), PEFT, diffusers or ComfyUI format; every module's ΔW is unchanged.

    Reads every spelling (kohya, LyCORIS, PEFT, diffusers, ComfyUI/BFL, OneTrainer, OMI, XLabs,
    cloneofsimo) of SD1.x, SD2.x, SDXL, Flux.1 and SD3/SD3.5 adapters.

    LyCORIS adapters (LoHa, LoKr, full-rank differences) and DoRA stay what they are in kohya
    format. --plain, --rank or --dynamic make a plain LoRA instead (what every loader and merge
    tool reads): exactly, or the best approximation at that rank (Eckart–Young), computed from the
    factors without dense weight matrices where the kind allows; the retained energy of every
    module is reported. DoRA needs --base.

    \b
    Examples:
      lorareg convert my_lora.safetensors --to peft -o out_dir/
      lorareg convert pytorch_lora_weights.safetensors --to kohya -o my_lora.safetensors
      lorareg convert x.safetensors --to diffusers -o pytorch_lora_weights.safetensors
      lorareg convert flux_diffusers.safetensors --to kohya --rank 32 -o flux_kohya.safetensors
      lorareg convert x_lokr.safetensors --to kohya --rank 32 -o x_lora.safetensors
      lorareg convert x_loha.safetensors --dynamic sv_fro:0.99 --max-rank 64 -o x_lora.safetensors
      lorareg convert x_dora.safetensors --plain --base sd15_model/ -o x_lora.safetensors
    """
    source = resolve_adapter(ctx, adapter)
    default = default_output(source, fmt)
    target = adapter_output(output, fmt, default.name) if output else default
    refuse_existing(target, fmt, force, input_files([source]))
    to_plain = as_plain or rank is not None or dynamic is not None or max_rank is not None or base is not None
    if to_plain:
        from loralib.compose.rank_rules import rank_rule

        rank_rule(rank, dynamic, max_rank)  # a wrong rule is reported before torch is imported
    import torch  # noqa: F401 - after the checks: a mistake is reported before the seconds torch takes

    from .threads import folder_bytes, use_threads

    storage = storage_dtype(dtype) if dtype else None
    make_parents(target)
    if to_plain:
        use_threads(folder_bytes([source]))
        _convert_to_lora(ctx, source, target, fmt, rank, dynamic, max_rank, base, svd, storage, force, drop_embeddings,
                         allow_pickle, allow_nonfinite, as_json, device)
        return
    from loralib.formats import convert

    use_threads(0)  # copying factors: one thread is enough
    result = convert(source, target, fmt, force=force, dtype=storage, drop_embeddings=drop_embeddings,
                     allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite, source_hashes=known_hashes(ctx, source))
    register_output(ctx, result)
    if as_json:
        print_json({"output": str(result.path), "format": result.format, "files": [str(f) for f in result.files],
                    "hashes": result.hashes.to_dict(), "notes": result.notes})
        return
    for line in result.notes:
        note(line)
    click.echo(f"wrote {result.format} adapter to {plain(result.path)}" + (
        f" (+{len(result.files) - 1} more files)" if len(result.files) > 1 else ""))
    click.echo(f"  A1111 hash {result.hashes.a1111}  AutoV2 {result.hashes.autov2}")


def _convert_to_lora(ctx: click.Context, source: Path, target: Path, fmt: str, rank, dynamic, max_rank, base, svd,
                     dtype, force: bool, drop_embeddings: bool, allow_pickle: bool, allow_nonfinite: bool,
                     as_json: bool, device: str = "auto") -> None:
    """``convert --plain/--rank/--dynamic``: a plain LoRA of any adapter, with its per-module report."""
    from loralib.compose import to_lora
    from loralib.formats import load_adapter

    from .compose import save_composition
    from .output import progress

    adapter = load_adapter(source, allow_pickle=allow_pickle)
    if drop_embeddings:
        adapter.embeddings = {}
    with progress("converting", enabled=not as_json) as update:
        composition = to_lora(adapter, rank, dynamic=dynamic, max_rank=max_rank, base=Path(base) if base else None,
                              svd=svd, dtype=dtype, progress=update, device=device)
    save_composition(ctx, composition, target, fmt, force, as_json, allow_nonfinite, rank)
