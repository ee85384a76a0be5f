"""Entry point of the ``lorareg`` command.

Commands live in modules of this package and are imported only when run, so ``lorareg --help``
and catalog commands start without importing torch. Every :class:`~loralib.errors.LoraError`
becomes one line on stderr and a non-zero exit; tracebacks appear only with ``--debug``. With
``--json`` an error is also printed on stdout as ``{"error": "…"}``, so scripts always get JSON.
"""

from __future__ import annotations

import importlib
import os
import sys

# numpy's BLAS (OpenBLAS) is used only for the fingerprint's thin products (a few columns wide),
# where a second thread only waits for the first: on a busy 2-core machine fingerprinting a
# 120 MiB file took 10-12 s with OpenBLAS' default threads and 0.9-1.6 s with one. Set before
# anything imports numpy; torch's threads (MKL/OpenMP, see cli/threads.py) are not affected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click

from loralib.errors import LoraError
from loralib.version import __version__

from .threads import mark_start

# name -> (module, function, one-line help). The help is here so that listing the commands
# imports none of them.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "inspect": ("lorareg.cli.adapters", "inspect_command", "Describe an adapter: format, architecture, modules, ranks, hashes."),
    "convert": ("lorareg.cli.adapters", "convert_command", "Convert an adapter between formats, or LyCORIS/DoRA into a plain LoRA."),
    "merge": ("lorareg.cli.compose", "merge_command", "Merge adapters with weights (exact, or best rank-k; ties, dare)."),
    "resize": ("lorareg.cli.compose", "resize_command", "Reduce an adapter's rank by exact SVD (fixed or dynamic rank)."),
    "bake": ("lorareg.cli.compose", "bake_command", "Fuse adapters into a base model (diffusers folder or single file)."),
    "extract": ("lorareg.cli.compose", "extract_command", "Extract a LoRA from the difference of two models."),
    "add": ("lorareg.cli.catalog", "add_command", "Add adapter files to the catalog (headers and hashes only)."),
    "scan": ("lorareg.cli.catalog", "scan_command", "Index a folder of adapters in place, incrementally and resumably."),
    "list": ("lorareg.cli.catalog", "list_command", "List catalog adapters (filter by architecture, format, tag)."),
    "search": ("lorareg.cli.catalog", "search_command", "Full-text search over names, tags, trigger words, metadata."),
    "show": ("lorareg.cli.catalog", "show_command", "Everything known about an adapter: hashes, files, source, lineage."),
    "tag": ("lorareg.cli.catalog", "tag_command", "Add (+tag) and remove (-tag) tags of a catalog adapter."),
    "rm": ("lorareg.cli.catalog", "rm_command", "Remove adapters from the catalog (files kept unless --delete-file)."),
    "verify": ("lorareg.cli.catalog", "verify_command", "Re-hash catalog files; report missing, moved and changed ones."),
    "lineage": ("lorareg.cli.catalog", "lineage_command", "The merge/resize/convert tree an adapter came from."),
    "duplicates": ("lorareg.cli.catalog", "duplicates_command",
                   "Copies, the same adapter in other formats or dtypes, and near-duplicates."),
    "push": ("lorareg.cli.hub", "push_command", "Upload an adapter to the Hugging Face Hub with a model card."),
    "pull": ("lorareg.cli.hub", "pull_command", "Download an adapter from the Hub, verify its SHA-256, register it."),
    "train": ("lorareg.cli.train", "train_command", "Train a LoRA on captioned images (TOML config or options)."),
    "generate": ("lorareg.cli.generate", "generate_command", "Render images with a base model and weighted adapters."),
    "tiny-model": ("lorareg.cli.train", "tiny_model_command", "Build a tiny random SD1/SD2/SDXL base model (demos, tests)."),
    "serve": ("lorareg.cli.web", "serve_command", "Start the playground: a local web page over the catalog, with actions."),
    "export-site": ("lorareg.cli.web", "export_site_command", "Write a static gallery of the catalog (HTML, images, JSON)."),
    "push-site": ("lorareg.cli.web", "push_site_command", "Publish the gallery as a static Hugging Face Space."),
}
# The module each optional dependency is imported as -> the extra that installs it (pyproject.toml).
EXTRA_MODULES: dict[str, str] = {
    "torch": "compose", "safetensors": "compose", "diffusers": "compose", "transformers": "compose",
    "peft": "train", "accelerate": "train", "tensorboard": "train", "PIL": "train",
    "prodigyopt": "train",
    "starlette": "web", "uvicorn": "web", "jinja2": "web", "multipart": "web",
}
SECTIONS: list[tuple[str, list[str]]] = [
    ("Adapters", ["inspect", "convert"]),
    ("Composition", ["merge", "resize", "bake", "extract"]),
    ("Catalog", ["add", "scan", "list", "search", "show", "tag", "rm", "verify", "lineage", "duplicates"]),
    ("Hub", ["push", "pull"]),
    ("Training and generation", ["train", "generate", "tiny-model"]),
    ("Playground", ["serve", "export-site", "push-site"]),
]


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for _, names in SECTIONS for name in names if name in COMMANDS]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for title, names in SECTIONS:
            rows = [(n, COMMANDS[n][2]) for n in names if n in COMMANDS]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lorareg")
@click.option("--home", type=click.Path(file_okay=False), envvar="LORAREG_HOME",
              help="Catalog folder (default: $LORAREG_HOME or the per-user data folder).")
@click.option("--debug", is_flag=True, envvar="LORAREG_DEBUG", help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, home: str | None, debug: bool) -> None:
    """lorareg — train, convert, merge, resize and catalog LoRA adapters for Stable Diffusion.

    Every command that takes an adapter accepts a .safetensors file, a PEFT or diffusers folder,
    a catalog name or hash prefix, or a Hub repo id.
    """
    ctx.obj = {**(ctx.obj or {}), "home": home, "debug": debug}


def _error(message: str, code: int, as_json: bool = False) -> int:
    from .output import print_error, print_json

    print_error(message)
    if as_json:
        print_json({"error": message, "exit_code": code})
    return code


def _wants_json(args: list[str]) -> bool:
    """True when the command line asks for --json (before any ``--``)."""
    return "--json" in (args[:args.index("--")] if "--" in args else args)
def quiet_warnings() -> None:
    """Keep library warnings (Python's ``warnings``: UserWarning, Pillow's DecompressionBombWarning…;
    huggingface_hub's log lines such as "Repo card metadata block was not found") off the
    terminal: the user sees lorareg's own lines, and errors as one line. ``--debug`` keeps them."""
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    if "huggingface_hub" in sys.modules:  # imported already (in-process use): its level is set
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and turn every user-facing error into one line and an exit code."""
    mark_start()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LORAREG_DEBUG") not in (None, "", "0")
    as_json = _wants_json(args)
    if not debug:
        quiet_warnings()
    try:
        # The command line as given, for messages that repeat it (train's "continue with").
        code = cli.main(args=args, prog_name="lorareg", standalone_mode=False, obj={"argv": args})
    except LoraError as exc:
        if debug:
            raise
        code = _error(str(exc), exc.exit_code, as_json)
    except click.exceptions.Abort:
        code = _error("aborted", 130, as_json)
    except click.ClickException as exc:
        if as_json:
            code = _error(exc.format_message(), exc.exit_code, as_json)
        else:
            exc.show()
            code = exc.exit_code
    except KeyboardInterrupt:
        code = _error("interrupted", 130, as_json)
    except OSError as exc:
        if debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        code = _error(f"{exc.strerror or exc}{where}", 1, as_json)
    except Exception as exc:  # a bug, or an optional dependency that is not installed
        if debug:
            raise
        code = _unexpected(exc, as_json)
    sys.exit(code if isinstance(code, int) else 0)


def _unexpected(exc: Exception, as_json: bool = False) -> int:
    """One line for an exception no command expected: the extra to install, or an internal error."""
    if isinstance(exc, ModuleNotFoundError):
        extra = EXTRA_MODULES.get((exc.name or "").split(".", 1)[0])
        if extra is not None:
            return _error(f"this command needs {exc.name}, which comes with lorareg's '{extra}' extra; "
                          f"install it with: pip install 'lorareg[{extra}]'", 1, as_json)
    return _error(f"internal error: {type(exc).__name__}: {exc}. Run again with --debug for the traceback, "
                  "and please report it", 2, as_json)


if __name__ == "__main__":
    main()
