"""``lorareg train`` and ``lorareg tiny-model``.

Every key of the training configuration is also an option (``--learning-rate 1e-4``), generated
from the configuration's dataclasses, so the file and the command line can never disagree. Values
are passed to the configuration as text and validated there, so every problem is reported at once.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from loralib.training import config as config_module
from loralib.units import human_size
from loralib.vocabulary import ARCHITECTURE_NAMES

from .libraries import quiet_libraries
from .output import note, print_json
from .paths import make_parents
from .refs import register_output
from .threads import folder_bytes, use_threads

# Short spellings users know from the tutorial and from sd-scripts, beside the --key-name of every key.
ALIASES = {"data_dir": ["--data"], "base_model": ["--base"], "num_epochs": ["--epochs"],
           "learning_rate": ["--lr"], "output_dir": ["-o"], "model_name": ["--name"]}


def _metavar(key: str) -> str:
    options = config_module.choices(key)
    if options:
        return "[" + "|".join(options) + "]"
    annotation = str(config_module.field_info(key).annotation)
    for word, metavar in (("int", "N"), ("float", "X"), ("Path", "PATH")):
        if word in annotation:
            return metavar
    return "TEXT"


def config_options(function):
    """Add one option per configuration key (``--key-name``; booleans as ``--key/--no-key``)."""
    for key in reversed(list(config_module.KEY_SECTIONS)):
        dashed = "--" + key.replace("_", "-")
        names = [dashed] + ALIASES.get(key, [])
        help_text = config_module.field_info(key).description
        if config_module.is_flag(key):
            option = click.option(f"{dashed}/--no-{key.replace('_', '-')}", key, default=None, help=help_text)
        elif config_module.is_list(key):
            option = click.option(*names, key, multiple=True, metavar="TEXT",
                                  help=help_text + " Repeatable; 'none' for an empty list.")
        else:
            unset = " Use 'none' to unset it." if config_module.is_optional(key) else ""
            option = click.option(*names, key, default=None, metavar=_metavar(key), help=help_text + unset)
        function = option(function)
    return function


def _overrides(values: dict[str, Any]) -> dict[str, Any]:
    """The options given on the command line; the word ``none`` unsets an optional key or empties a list."""
    chosen = {}
    for key, value in values.items():
        if value is None or (isinstance(value, tuple) and not value):
            continue
        if isinstance(value, tuple):
            chosen[key] = [] if [v.lower() for v in value] == ["none"] else list(value)
        elif isinstance(value, str) and value.lower() == "none" and config_module.is_optional(key):
            chosen[key] = None
        else:
            chosen[key] = value
    return chosen


class TrainingDisplay:
    """A Rich progress bar (step, epoch, loss, learning rate, speed) on a terminal; plain lines elsewhere.

    Every phase of the preparation shows from its start (a line per phase when not on a terminal),
    and messages go through the bar's console, so they never run into it.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.bar = None
        self.tasks: dict[str, Any] = {}
        self.waiting: str | None = None
        self.validation = ""  # the latest validation loss, shown beside the loss

    def __enter__(self) -> TrainingDisplay:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            from .output import console

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("<"),
                                TimeRemainingColumn(), console=console(stderr=True))
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def phase(self, description: str, done: int, total: int) -> None:
        """Preparation progress (checking images, caching, samples)."""
        self.waited()
        if not self.enabled:
            return
        if description not in self.tasks:
            if not self.live:
                self.tasks[description] = None
                print(f"{description}…", file=sys.stderr, flush=True)
                return
            self.tasks[description] = self.bar.add_task(description, total=total, completed=done, info="",
                                                        visible=done < total)
            return
        if self.live:
            self.bar.update(self.tasks[description], completed=done, total=total, visible=done < total)

    def wait(self, description: str) -> None:
        """Show that something without steps is under way (importing libraries) until the next phase."""
        self.waited()
        if not self.enabled:
            return
        if not self.live:
            print(f"{description}…", file=sys.stderr, flush=True)
            return
        self.waiting = self.bar.add_task(description, total=None, info="")

    def waited(self) -> None:
        """End the wait shown by :meth:`wait`."""
        if self.waiting is not None and self.bar is not None:
            self.bar.remove_task(self.waiting)
        self.waiting = None

    def message(self, text: str) -> None:
        """A line on stderr that does not run into the progress bar."""
        if self.bar is not None:
            self.bar.console.print(f"[dim]{_escaped(text)}[/]")
        else:
            note(text)

    def step(self, report) -> None:
        """One optimizer step done."""
        self.waited()
        speed = f"{report.steps_per_second:.2f} steps/s" if report.steps_per_second else "—"
        if report.validation_loss is not None:
            self.validation = f"  val {report.validation_loss:.4f}"
        info = (f"epoch {report.epoch}/{report.num_epochs}  loss {report.loss:.4f}{self.validation}  "
                f"lr {report.learning_rate:.2e}  {speed}")
        if self.live:
            if "train" not in self.tasks:
                self.tasks["train"] = self.bar.add_task("training", total=report.total_steps, info=info)
            self.bar.update(self.tasks["train"], completed=report.step, total=report.total_steps, info=info)
        elif self.enabled:
            every = max(1, report.total_steps // 20)
            if report.step % every == 0 or report.step == report.total_steps or report.step == 1 \
                    or report.validation_loss is not None:
                print(f"step {report.step}/{report.total_steps}  {info}", file=sys.stderr, flush=True)


@click.command("train")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--resume", metavar="latest|PATH", help="Continue from the newest checkpoint of output_dir (latest) "
                                                      "or from a checkpoint folder.")
@click.option("--print-config", is_flag=True, help="Print the configuration (defaults, the file and the options "
                                                   "merged) as a commented TOML file, and stop.")
@click.option("--dry-run", is_flag=True, help="Check the configuration and the dataset, print the plan, and stop.")
@click.option("--force", is_flag=True, help="Overwrite an existing adapter and start over where an earlier run "
                                            "left checkpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@config_options
@click.pass_context
def train_command(ctx: click.Context, config: str | None, resume: str | None, print_config: bool, dry_run: bool,
                  force: bool, as_json: bool, **values: Any) -> None:
    """Train a LoRA on a folder of captioned images; every config key is also an option below.

    CONFIG is a TOML file (see --print-config); options override its values. The adapter, its
    checkpoints/, samples/ and TensorBoard runs/ go to output_dir (default output/<model_name>).
    The adapter is registered in the catalog with its configuration and dataset summary.
    Ctrl-C saves a checkpoint and stops; --resume latest continues exactly where it stopped.

    \b
    Examples:
      lorareg train --print-config > train.toml
      lorareg train train.toml
      lorareg train --data data/ --base stable-diffusion-v1-5/stable-diffusion-v1-5 --rank 8 --epochs 10
      lorareg train train.toml --resume latest
      accelerate launch -m lorareg train train.toml      # several GPUs or machines
    """
    from loralib.pipelines import check_base_model
    from loralib.training.config import load_config

    settings = load_config(config, _overrides(values))
    if print_config:
        click.echo(settings.to_toml(), nl=False)
        return
    if dry_run:
        _dry_run(settings, as_json)
        return
    from loralib.training.dataset import scan_configured

    with TrainingDisplay(enabled=not as_json) as display:
        # The data and the base model are checked before torch and diffusers load, so their problems show at once.
        dataset = scan_configured(settings, lambda done, total: display.phase("checking images", done, total))
        check_base_model(settings.model.base_model, settings.model.base_components)
        display.wait("loading torch, diffusers and peft")
        quiet_libraries()
        from loralib.training.trainer import Trainer

        use_threads(folder_bytes([settings.model.base_model]))
        make_parents(Path(settings.output_dir))
        trainer = Trainer(settings, resume=resume, force=force, on_step=display.step, on_phase=display.phase,
                          dataset=dataset)
        trainer.setup()
        if not trainer.accelerator.is_main_process:  # one of several processes: only the main one reports
            display.enabled = display.live = False
            trainer.run()
            return
        if not as_json:
            display.message(f"training {settings.model.model_name}: {trainer.total_steps} steps ({trainer.num_epochs} "
                            f"epochs of {trainer.steps_per_epoch}) on {trainer.device}, {len(trainer.dataset.records)} "
                            f"images, from step {trainer.step}; output in {trainer.output_dir}")
        result = trainer.run()
    if result.save is not None:
        register_output(ctx, result.save, samples=final_samples(result.samples))
    if as_json:
        print_json(result.to_dict())
    else:
        _print_result(result, continue_command(ctx))
    if result.interrupted:
        ctx.exit(130)


def _escaped(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def final_samples(paths: list[Path]) -> list[Path]:
    """The sample images rendered at the last sampling step (``<name>-step<N>-<i>.png``): made with the saved adapter."""
    import re

    steps = {path: int(m.group(1)) for path in paths if (m := re.search(r"-step(\d+)-\d+\.png$", path.name))}
    if not steps:
        return []
    last = max(steps.values())
    return [path for path, step in steps.items() if step == last]


def continue_command(ctx: click.Context) -> str | None:
    """The command that continues an interrupted run: the same command line, with ``--resume latest``
    instead of any ``--resume`` or ``--force`` (None when the command line is not known)."""
    root = ctx.find_root()
    argv = (root.obj or {}).get("argv") if isinstance(root.obj, dict) else None
    if not argv or "train" not in argv:
        return None
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token == "--resume":
            skip = True
            continue
        if token.startswith("--resume=") or token == "--force":
            continue
        kept.append(token)
    return shlex.join(["lorareg", *kept, "--resume", "latest"])


def _dry_run(settings, as_json: bool) -> None:
    from loralib.training.dataset import BatchPlan, scan_configured, training_and_validation

    dataset, validation = training_and_validation(settings, scan_configured(settings))
    plan = BatchPlan.for_config(dataset, settings)
    steps_per_epoch, total, _ = plan.length(settings)
    summary = {**dataset.summary(plan.bucket_counts()), "steps_per_epoch": steps_per_epoch, "total_steps": total,
               "validation_images": len(validation.records) if validation else 0,
               "output_dir": str(settings.output_dir)}
    if as_json:
        print_json(summary)
        return
    click.echo(f"dataset {dataset.root} ({dataset.layout} layout): {len(dataset.records)} images, "
               f"{dataset.images_per_epoch} per epoch with repeats")
    if validation is not None:
        click.echo(f"validation: {len(validation.records)} images")
    click.echo("sizes: " + ", ".join(f"{k} ×{v}" for k, v in summary.get("buckets", {}).items()))
    click.echo(f"plan: {steps_per_epoch} steps per epoch, {total} steps; output in {settings.output_dir}")


def _print_result(result, again: str | None) -> None:
    if result.interrupted:
        again = again or "the same command with --resume latest"
        note(f"interrupted at step {result.steps} of {result.total_steps}; checkpoint saved to {result.checkpoint}")
        click.echo(f"continue with: {again}", err=True)  # unwrapped and unstyled: it is copied as it is
        return
    save = result.save
    size = human_size(save.path.stat().st_size) if save.path.is_file() else "folder"
    speed = f", {result.steps_per_second:.2f} steps/s" if result.steps_per_second else ""
    click.echo(f"wrote {save.format} adapter to {save.path} ({size})")
    click.echo(f"  {result.steps} steps, final loss {result.losses[-1]:.4f}, {result.seconds:.1f} s{speed}")
    if result.validation_losses:
        click.echo(f"  validation loss {result.validation_losses[-1][1]:.4f}")
    click.echo(f"  A1111 hash {save.hashes.a1111}  AutoV2 {save.hashes.autov2}")
    click.echo(f"  checkpoint {result.checkpoint}")
    if result.samples:
        click.echo(f"  samples in {result.samples[-1].parent}")
    if result.config.output.tensorboard:
        click.echo(f"  TensorBoard: tensorboard --logdir {result.output_dir / 'runs'}")


@click.command("tiny-model")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(ARCHITECTURE_NAMES), default="sd1", show_default=True,
              help="Architecture of the tiny model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of its random weights.")
@click.option("--single-file", type=click.Path(dir_okay=False), default=None,
              help="Also write the transformer (Flux.1/SD3/SD3.5) as one .safetensors file in the original "
                   "BFL/MMDiT names, like flux1-dev.safetensors.")
@click.option("--comfy", is_flag=True, help="Prefix the --single-file names with model.diffusion_model. as "
                                             "ComfyUI's all-in-one checkpoints do.")
@click.option("--force", is_flag=True, help="Replace an existing folder.")
def tiny_model_command(output: str, arch: str, seed: int, single_file: str | None, comfy: bool, force: bool) -> None:
    """Build a tiny random base model of any architecture (a diffusers folder) for demos and tests.

    SD1-, SD2-, SDXL-, Flux.1- (FluxPipeline: CLIP + T5) and SD3/SD3.5-shaped
    (StableDiffusion3Pipeline: CLIP-L, CLIP-G, T5) pipelines with the real model classes and
    module names, so adapters made for them have real keys; their images are noise-like. Built
    offline in seconds.

    \b
    Examples:
      lorareg tiny-model demo/base --arch sd1
      lorareg tiny-model demo/flux --arch flux
      lorareg tiny-model demo/flux --arch flux --single-file demo/flux1-tiny.safetensors
    """
    quiet_libraries()
    from loralib.tiny_models import write_tiny_model

    use_threads(0)
    make_parents(Path(output.rstrip("/") or output))

    path = write_tiny_model(Path(output), arch, seed=seed, force=force, single_file=single_file,
                            single_file_prefix="model.diffusion_model." if comfy else "")
    click.echo(f"wrote tiny {arch} base model to {path}")
    if single_file:
        click.echo(f"wrote its transformer as a single file to {single_file}")
