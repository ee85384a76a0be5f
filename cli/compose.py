"""``lorareg merge``, ``resize``, ``bake`` and ``extract``: composition of adapters and models.

Adapter arguments take an optional weight after the last colon (``a.safetensors:0.7``); an
argument that is an existing path as a whole (``C:\\loras\\x.safetensors``, ``odd:name``) has
weight 1. Every command checks its arguments (inputs, output, rank) before it imports torch, so a
mistake is reported at once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from loralib.dtypes import storage_dtype
from loralib.errors import InvalidArgumentError
from loralib.files.atomic import refuse_overwrite
from loralib.formats import input_files
from loralib.units import human_size
from loralib.vocabulary import COMPONENTS, DEVICES, MERGE_METHODS, STORAGE_DTYPES, SVD_METHODS, WRITE_FORMATS

from .output import note, plain, print_json, progress, shown
from .paths import adapter_output, make_parents, output_file, refuse_existing
from .refs import complete_adapters, load_input, register_output, resolve_adapter
from .threads import folder_bytes, use_threads

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def parse_weighted(argument: str) -> tuple[str, float]:
    """Split ``REF:WEIGHT`` at the last colon; a whole argument that exists as a path has weight 1."""
    if os.path.exists(os.path.expanduser(argument)) or ":" not in argument:  # never raises, even for a too-long name
        return argument, 1.0
    reference, _, tail = argument.rpartition(":")
    if _NUMBER.match(tail.strip()) and reference:
        return reference, float(tail)
    if "/" in tail or "\\" in tail:  # a colon inside a path (C:\…, hf:user/repo), not a weight
        return argument, 1.0
    raise InvalidArgumentError(f"cannot read the weight in {argument!r}: {tail!r} is not a number",
                               "Write ADAPTER:WEIGHT, e.g. style.safetensors:0.7 (or ADAPTER alone for weight 1)")


def _resolve_weighted(ctx: click.Context, arguments: tuple[str, ...]) -> list[tuple[Path, float]]:
    return [(resolve_adapter(ctx, reference), weight) for reference, weight in map(parse_weighted, arguments)]


def _dtype(name: str | None):
    return storage_dtype(name) if name is not None else None


def _checked_rule(command: str, rank: int | None, dynamic: str | None, max_rank: int | None, *, required: bool):
    """Check the rank options without torch; a command that needs a rank says so before any work."""
    from loralib.compose.rank_rules import rank_rule

    rule = rank_rule(rank, dynamic, max_rank)
    if rule is None and required:
        raise InvalidArgumentError(f"{command} needs a target rank or a dynamic rule",
                                   "Pass --rank N, or --dynamic sv_fro:0.95 (optionally with --max-rank N)")
    return rule


def _existing_model(text: str) -> Path:
    """A model path given to bake or extract, refused at once when it does not exist."""
    from loralib.errors import InputNotFoundError

    path = Path(text).expanduser()
    if not path.exists():
        raise InputNotFoundError(f"the model {text} does not exist",
                                 "Give a diffusers folder or a single-file .safetensors checkpoint")
    return path


def _prepare_output(output: str, fmt: str, default_name: str, force: bool, inputs=()) -> Path:
    """The output path for ``-o`` (see :mod:`lorareg.cli.paths`), refused when it is an input or
    exists (unless ``force``)."""
    target = adapter_output(output, fmt, default_name)
    refuse_existing(target, fmt, force, inputs)
    return target


def _rank_options(function):
    options = [
        click.option("--rank", "-r", type=int, help="Keep at most this rank per module (best approximation)."),
        click.option("--dynamic", metavar="RULE",
                     help="Choose the rank per module: sv_fro:F (retained Frobenius norm ≥ F), sv_ratio:N "
                          "(σ ≥ σ_max/N) or sv_cumulative:F (Σσ ≥ F of the total)."),
        click.option("--max-rank", type=int, help="Cap on the rank a --dynamic rule may choose."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _base_option(function):
    return click.option("--base", type=click.Path(),
                        help="Base model (diffusers folder or .safetensors checkpoint) for DoRA inputs, "
                             "whose ΔW depends on it.")(function)


def device_option(function):
    """``--device auto|cpu|cuda``: where the modules are computed (files are read and written on the CPU)."""
    return click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                        help="Compute on the CPU or a CUDA GPU; auto: the GPU when torch sees one.")(function)


def _output_options(function):
    options = [
        click.option("-o", "--output", type=click.Path(), required=True, help="Output file (or folder for --to peft)."),
        click.option("--to", "fmt", type=click.Choice(WRITE_FORMATS), default="kohya", show_default=True,
                     help="Output format."),
        click.option("--dtype", type=click.Choice(sorted(STORAGE_DTYPES)),
                     help="Store factors in this dtype (default: the inputs')."),
        click.option("--force", is_flag=True, help="Overwrite an existing output."),
        click.option("--json", "as_json", is_flag=True, help="Print the result and per-module report as JSON."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def save_composition(ctx: click.Context, composition, output: Path, fmt: str, force: bool, as_json: bool,
                     allow_nonfinite: bool = False, rank: int | None = None) -> None:
    """Save a composition, record it in the catalog and print its summary.

    With a fixed ``rank``, layers the output format fuses (Flux/SD3 ``qkv``) are kept at that rank too.
    """
    make_parents(output)
    result = composition.save(output, fmt, force=force, allow_nonfinite=allow_nonfinite, fused_rank=rank)
    modules = _modules_line(composition.adapter)
    composition.drop_factors()  # the catalog reads the written file: the factors need not stay in memory meanwhile
    register_output(ctx, result)
    size = sum(f.stat().st_size for f in result.files if f.exists())
    report = composition.report
    if as_json:
        print_json({"output": str(result.path), "format": result.format, "files": [str(f) for f in result.files],
                    "size": size, "hashes": result.hashes.to_dict(), "notes": result.notes,
                    "report": report.to_dict()})
        return
    for line in report.notes + result.notes:
        note(line)
    _print_summary(composition.report, result, size, modules)


def _modules_line(adapter) -> str:
    """How many modules, per component: ``"986 (unet 722, text_encoder 72, …)"``."""
    components = ", ".join(f"{c} {sum(1 for k in adapter.modules if k.startswith(c + '.'))}"
                           for c in adapter.components)
    return f"{len(adapter.modules)} ({components})"


def _print_summary(report, result, size: int, modules: str) -> None:
    from rich.table import Table

    from .output import console

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("wrote", f"{shown(result.path)} [dim]({result.format})[/]")
    table.add_row("modules", modules)
    table.add_row("rank", _ranks(report.ranks))
    retained = report.retained_summary()
    if retained and report.max_error == 0:
        table.add_row("retained energy", "1 on every module (exact)")
    elif retained:
        table.add_row("retained energy", f"min {retained['min']:.4f}  median {retained['median']:.4f}  "
                                         f"max {retained['max']:.4f}  [dim](‖ΔW_k‖/‖ΔW‖ per module)[/]")
        table.add_row("largest error", f"{report.max_error:.4f} relative, in {shown(report.worst_module)}")
    table.add_row("size", f"{human_size(size)}, {report.parameters:,} values")
    table.add_row("A1111 hash", f"{result.hashes.a1111}  [dim]AutoV2 {result.hashes.autov2}[/]")
    console().print(table)


def _ranks(ranks: dict[int, int]) -> str:
    if len(ranks) <= 4:
        return ", ".join(f"{r} ×{n}" for r, n in ranks.items())
    return f"{min(ranks)}–{max(ranks)} ({len(ranks)} different ranks)"


@click.command("merge")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...", shell_complete=complete_adapters)
@_rank_options
@click.option("--method", type=click.Choice(MERGE_METHODS), default="concat", show_default=True,
              help="concat: the exact weighted sum. linear: peft's factor-wise sum (not exact). "
                   "ties / dare: the papers' methods on each module's ΔW.")
@click.option("--density", type=float, help="ties/dare: fraction of each ΔW's entries to keep (0 < d ≤ 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="dare: seed of the random drop masks.")
@click.option("--svd", type=click.Choice(SVD_METHODS), default="auto", show_default=True,
              help="ties/dare (and full-rank/DoRA inputs): how a dense merged ΔW is factorised.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Merge inputs holding NaN or infinite values into the output (exact merge only; refused by default).")
@_base_option
@device_option
@_output_options
@click.pass_context
def merge_command(ctx: click.Context, adapters: tuple[str, ...], rank: int | None, dynamic: str | None,
                  max_rank: int | None, method: str, density: float | None, seed: int, svd: str,
                  allow_nonfinite: bool, base: str | None, device: str, output: str, fmt: str, dtype: str | None,
                  force: bool, as_json: bool) -> None:
    """Merge adapters with weights: every module's ΔW becomes Σ weight · ΔW, exactly.

    Without --rank the result is exact (its rank is the sum of the input ranks); with --rank K it
    is the best rank-K approximation of the exact sum (no rank-K adapter is closer), computed
    without ever forming a dense weight matrix. Inputs may be LyCORIS (LoHa, LoKr, full-rank
    differences) or DoRA (with --base); the output is a plain LoRA.

    \b
    Examples:
      lorareg merge a.safetensors:0.7 b.safetensors:0.3 -o ab.safetensors
      lorareg merge a.safetensors:0.7 b.safetensors:-0.3 c_peft_dir:1.0 --rank 32 -o abc.safetensors
      lorareg merge a:0.5 b:0.5 --method ties --density 0.3 --rank 32 -o t.safetensors
    """
    inputs = _resolve_weighted(ctx, adapters)
    _checked_rule("merge", rank, dynamic, max_rank, required=False)
    target = _prepare_output(output, fmt, "merged.safetensors", force, input_files(path for path, _ in inputs))
    from loralib.compose import merge

    use_threads(folder_bytes(path for path, _ in inputs))
    loaded = [(load_input(ctx, path), weight) for path, weight in inputs]
    with progress("merging", enabled=not as_json) as update:
        composition = merge(loaded, rank, method=method, dynamic=dynamic, max_rank=max_rank, density=density,
                            seed=seed, svd=svd, dtype=_dtype(dtype), base=Path(base) if base else None,
                            progress=update, allow_nonfinite=allow_nonfinite, device=device)
    save_composition(ctx, composition, target, fmt, force, as_json, allow_nonfinite, rank)


@click.command("resize")
@click.argument("adapter", shell_complete=complete_adapters)
@_rank_options
@_base_option
@device_option
@_output_options
@click.pass_context
def resize_command(ctx: click.Context, adapter: str, rank: int | None, dynamic: str | None, max_rank: int | None,
                   base: str | None, device: str, output: str, fmt: str, dtype: str | None, force: bool,
                   as_json: bool) -> None:
    """Reduce ADAPTER's rank by exact SVD: each module becomes its best approximation at the new rank.

    Modules already at or below --rank are kept bit for bit. LyCORIS and DoRA modules (with --base)
    become plain LoRA modules of that rank. For Flux.1/SD3 written in kohya or ComfyUI names, fused
    layers (qkv, linear1) are also stored at --rank.

    \b
    Examples:
      lorareg resize big.safetensors --rank 16 -o small.safetensors
      lorareg resize big.safetensors --dynamic sv_fro:0.95 --max-rank 64 -o small.safetensors
    """
    source = resolve_adapter(ctx, adapter)
    rule = _checked_rule("resize", rank, dynamic, max_rank, required=True)
    stem = source.stem if source.is_file() else source.name
    suffix = f"r{int(rule.value)}" if rule.kind == "fixed" else "resized"
    target = _prepare_output(output, fmt, f"{stem}_{suffix}.safetensors", force, input_files([source]))
    from loralib.compose import resize

    use_threads(folder_bytes([source]))
    with progress("resizing", enabled=not as_json) as update:
        composition = resize(load_input(ctx, source), rank, dynamic=dynamic, max_rank=max_rank, dtype=_dtype(dtype),
                             base=Path(base) if base else None, progress=update, device=device)
    save_composition(ctx, composition, target, fmt, force, as_json, rank=rank)


@click.command("bake")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...", shell_complete=complete_adapters)
@click.option("-o", "--output", type=click.Path(), required=True,
              help="Output folder (diffusers base) or .safetensors file (single-file base).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def bake_command(ctx: click.Context, base: str, adapters: tuple[str, ...], output: str, force: bool, device: str,
                 as_json: bool) -> None:
    """Fuse adapters into BASE (a diffusers folder or a single-file checkpoint) and write a new model.

    Each adapted weight becomes W + Σ weight · ΔW, added in float32 and stored in the base's
    dtype. The output has the base's layout: a diffusers folder or a single .safetensors file.

    \b
    Examples:
      lorareg bake sd15_model/ style.safetensors:0.8 detail.safetensors:0.4 -o merged_model/
      lorareg bake sdxl_base.safetensors style.safetensors -o sdxl_style.safetensors
    """
    base_path = _existing_model(base)
    inputs = _resolve_weighted(ctx, adapters)
    target = Path(output.rstrip("/")) if base_path.is_dir() else output_file(output, f"{base_path.stem}_baked.safetensors")
    refuse_overwrite(target, force, input_files([base_path, *(path for path, _ in inputs)]))
    from loralib.compose import bake

    use_threads(folder_bytes([base_path]))
    make_parents(target)
    with progress("baking", enabled=not as_json) as update:
        result = bake(base_path, inputs, target, force=force, progress=update, device=device)
    if as_json:
        print_json({"output": str(result.path), "kind": result.kind, "files": [str(f) for f in result.files],
                    "layers": result.layers, "modules": result.modules, "notes": result.notes})
        return
    for line in result.notes:
        note(line)
    size = sum(f.stat().st_size for f in result.files if f.exists())
    kind = "diffusers folder" if result.kind == "diffusers" else "single-file checkpoint"
    click.echo(f"wrote {kind} {plain(result.path)} ({human_size(size)})")
    click.echo(f"  fused {result.modules} adapter modules into {result.layers} weights")


@click.command("extract")
@click.argument("base")
@click.argument("tuned")
@_rank_options
@click.option("--conv-rank", type=int, help="Also extract 3×3 convolutions (LoCon) at this rank.")
@click.option("--component", "components", multiple=True,
              type=click.Choice(COMPONENTS),
              help="Only these components (repeatable; default: all present in both models).")
@click.option("--min-diff", type=float, default=0.0, show_default=True,
              help="Leave out layers whose largest change is at most this.")
@click.option("--svd", type=click.Choice(SVD_METHODS), default="auto", show_default=True,
              help="auto: randomized where the rank is far below the layer size, else exact.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@device_option
@_output_options
@click.pass_context
def extract_command(ctx: click.Context, base: str, tuned: str, rank: int | None, dynamic: str | None,
                    max_rank: int | None, conv_rank: int | None, components: tuple[str, ...], min_diff: float,
                    svd: str, seed: int, device: str, output: str, fmt: str, dtype: str | None, force: bool,
                    as_json: bool) -> None:
    """Extract a LoRA from the difference TUNED − BASE (diffusers folders or single-file checkpoints).

    Works one layer at a time, so memory stays small whatever the model size.

    \b
    Examples:
      lorareg extract sd15_base/ my_finetune/ --rank 32 -o extracted.safetensors
      lorareg extract base.safetensors tuned.safetensors --dynamic sv_fro:0.9 --max-rank 64 -o x.safetensors
    """
    _existing_model(base)
    tuned_path = _existing_model(tuned)
    _checked_rule("extract", rank, dynamic, max_rank, required=True)
    stem = tuned_path.stem if tuned_path.is_file() else tuned_path.name
    target = _prepare_output(output, fmt, f"{stem}_extracted.safetensors", force, [Path(base).expanduser(), tuned_path])
    from loralib.compose import extract

    use_threads(folder_bytes([base, tuned]))
    with progress("extracting", enabled=not as_json) as update:
        composition = extract(Path(base).expanduser(), tuned_path, rank, dynamic=dynamic,
                              max_rank=max_rank, conv_rank=conv_rank, components=components or None,
                              min_diff=min_diff, svd=svd, seed=seed, dtype=_dtype(dtype), progress=update,
                              device=device)
    save_composition(ctx, composition, target, fmt, force, as_json, rank=rank)
