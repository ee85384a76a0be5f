"""``lorareg generate``: images from a base model and any number of weighted adapters."""

from __future__ import annotations

import secrets
from pathlib import Path

import click

from loralib.vocabulary import SCHEDULERS

from .compose import parse_weighted
from .libraries import quiet_libraries
from .output import print_json, progress
from .paths import make_parents
from .refs import attach_samples, complete_adapters, resolve_adapter
from .threads import folder_bytes, use_threads


def display_name(reference: str) -> str:
    """The adapter's name in the image's parameters: the file's stem, or the catalog/Hub name."""
    path = Path(reference).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.name
    return reference.split("@")[0].rstrip("/").split("/")[-1]


@click.command("generate")
@click.argument("prompt")
@click.option("--base", required=True, metavar="MODEL", help="Base model: a diffusers folder, a .safetensors "
                                                             "checkpoint or a Hub id.")
@click.option("--base-components", default=None, metavar="FOLDER",
              help="Diffusers folder with the tokenizers, scheduler and configurations (and any VAE or text "
                   "encoder the file lacks) for a single-file Flux.1/SD3 --base.")
@click.option("--lora", "loras", multiple=True, metavar="REF[:WEIGHT]", shell_complete=complete_adapters,
              help="An adapter (file, folder, catalog name, hash prefix or Hub id) and its weight (default 1); "
                   "repeatable.")
@click.option("--negative", default="", help="Negative prompt.")
@click.option("-n", "--num-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images to render; image i uses seed + i.")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of the first image (default: random).")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Denoising steps.")
@click.option("--guidance-scale", "--cfg", type=float, default=None,
              help="Classifier-free guidance scale; for Flux.1, its distilled guidance (default: 7, Flux.1 3.5).")
@click.option("--width", type=click.IntRange(min=8), default=None, help="Width in pixels (default: the model's).")
@click.option("--height", type=click.IntRange(min=8), default=None, help="Height in pixels (default: the model's).")
@click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default=None,
              help="Sampler (default: the model's own scheduler; Flux.1/SD3: euler or heun, flow-matching).")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default="samples", show_default=True,
              help="Folder for the PNGs (named NNNNN-<seed>.png).")
@click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def generate_command(ctx: click.Context, prompt: str, base: str, base_components: str | None,
                     loras: tuple[str, ...], negative: str,
                     num_samples: int, seed: int | None, steps: int, guidance_scale: float | None, width: int | None,
                     height: int | None, scheduler: str | None, output_dir: str, device: str | None,
                     as_json: bool) -> None:
    """Render PROMPT with a base model and weighted adapters into PNGs with A1111-style parameters.

    The base model is loaded once and the adapters are fused into it with their weights. Every
    PNG records prompt, negative prompt, steps, sampler, CFG scale, seed, size, the base model's
    hash and the adapters' A1111 hashes (the "parameters" text chunk A1111, ComfyUI and Civitai
    read). The same seed gives the same image. The images are attached to the catalog entries
    of the adapters used (see `lorareg show`).

    \b
    Examples:
      lorareg generate "a pxl style castle" --base base/ --lora pixel-art:0.8 --lora other:0.3 -n 4 --seed 7
      lorareg generate "a cat" --base stable-diffusion-v1-5/stable-diffusion-v1-5 --lora my_lora.safetensors
      lorareg generate "a cat" --base black-forest-labs/FLUX.1-dev --lora flux_lora.safetensors --steps 28
    """
    from loralib.pipelines import check_base_model

    adapters, names = [], []
    for item in loras:
        reference, weight = parse_weighted(item)
        adapters.append((resolve_adapter(ctx, reference), weight))
        names.append(display_name(reference))
    check_base_model(base, base_components)
    quiet_libraries()
    import torch

    from loralib.generation import generate

    use_threads(folder_bytes([base]))
    make_parents(Path(output_dir.rstrip("/") or output_dir))
    if device is None and torch.cuda.is_available():
        device = "cuda"
    seed = secrets.randbelow(2**32) if seed is None else seed
    with progress("rendering", num_samples, enabled=not as_json) as update:
        result = generate(base, prompt, adapters, names=names, output_dir=output_dir, num_samples=num_samples,
                          seed=seed, steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                          negative_prompt=negative, scheduler=scheduler, device=device, progress=update,
                          base_components=base_components)
    attach_samples(ctx, [image.path for image in result.images], result.adapters)
    if as_json:
        print_json(result.to_dict())
        return
    for image in result.images:
        click.echo(f"wrote {image.path} (seed {image.seed})")
    if result.adapters:
        click.echo("  adapters: " + ", ".join(f"{a.name}:{a.weight:g}" + (f" [{a.a1111_hash}]" if a.a1111_hash else "")
                                              for a in result.adapters))
