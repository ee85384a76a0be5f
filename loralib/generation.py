"""Rendering images with a base model and any number of LoRA adapters, the way A1111 records them.

The base model is loaded once; adapters are fused into its weights with their weights
(``W += weight · alpha / rank · up @ down``, computed in float32 — the same result as diffusers'
``load_lora_weights`` + ``set_adapters`` + ``fuse_lora``, and it works for every module kind
lorareg reads, LoCon and CP-decomposed convs included) and can be removed again exactly.
Every PNG carries AUTOMATIC1111's ``parameters`` text chunk — prompt, negative prompt, steps,
sampler, CFG scale, seed, size, ``Lora hashes`` — that A1111, ComfyUI, Civitai and image viewers
read, plus a ``lorareg`` chunk with the same facts as JSON. Image ``i`` uses seed ``seed + i``, and
the same seed always gives the same image.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import InvalidArgumentError, MismatchError
from .files.atomic import atomic_file
from .vocabulary import SCHEDULERS

if TYPE_CHECKING:
    from PIL import Image

    from .adapter import LoraAdapter
    from .files.hashes import FileHashes

_A1111_NAMES = {cls: name for cls, extra, name in SCHEDULERS.values() if not extra}


@dataclass
class AdapterUse:
    """One adapter applied to a generation: its name, file, weight and A1111 short hash."""

    name: str
    weight: float
    path: Path | None = None
    a1111_hash: str | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (for the ``lorareg`` PNG chunk and ``--json``)."""
        return {"name": self.name, "weight": self.weight, "path": str(self.path) if self.path else None,
                "a1111_hash": self.a1111_hash, "sha256": self.sha256}


@dataclass
class GenerationSettings:
    """Everything that decides an image besides the models."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = 0
    sampler: str = ""

    def check(self, vae_scale_factor: int = 8) -> None:
        """Refuse values no pipeline can use."""
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be at least 1 (got {self.steps})")
        for side, value in (("width", self.width), ("height", self.height)):
            if value < vae_scale_factor or value % vae_scale_factor:
                problems.append(f"{side} must be a positive multiple of {vae_scale_factor} (got {value})")
        if self.guidance_scale < 0:
            problems.append(f"guidance scale must not be negative (got {self.guidance_scale})")
        if problems:
            raise InvalidArgumentError("; ".join(problems))


@dataclass
class GeneratedImage:
    """One rendered image, its seed, its A1111 parameters text, and where it was saved."""

    image: Image.Image
    seed: int
    parameters: str
    path: Path | None = None


@dataclass
class FusedAdapters:
    """Adapters fused into a pipeline; :meth:`remove` restores the original weights exactly."""

    uses: list[AdapterUse]
    originals: dict[str, Any] = field(default_factory=dict, repr=False)
    layers: dict[str, Any] = field(default_factory=dict, repr=False)

    def remove(self) -> None:
        """Put back the base weights that fusing changed."""
        import torch

        with torch.no_grad():
            for key, weight in self.originals.items():
                self.layers[key].weight.copy_(weight)
        self.originals.clear()


def scheduler_for(pipe, name: str | None):
    """The pipeline's scheduler, or the named one built from its config."""
    import diffusers

    if not name:
        return pipe.scheduler
    if name not in SCHEDULERS:
        raise InvalidArgumentError(f"unknown scheduler {name!r}", f"Choose one of {', '.join(SCHEDULERS)}")
    class_name, extra, _ = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)


def sampler_name(scheduler) -> str:
    """A1111's name for a diffusers scheduler (``Euler a``, ``DPM++ 2M Karras``, …)."""
    class_name = type(scheduler).__name__
    if class_name == "DPMSolverMultistepScheduler" and scheduler.config.get("use_karras_sigmas"):
        return "DPM++ 2M Karras"
    return _A1111_NAMES.get(class_name, class_name.removesuffix("Scheduler"))


def fuse_adapters(pipe, adapters: Sequence[tuple[LoraAdapter, float, AdapterUse]]) -> FusedAdapters:
    """Add ``weight · ΔW`` of every adapter to the pipeline's weights (float32 arithmetic).

    Architectures and layer shapes are checked for all adapters before any weight changes.
    """
    import torch

    from .base_model import pipeline_layers

    layers = pipeline_layers(pipe)
    base_arch = _pipeline_architecture(pipe)
    for adapter, _, use in adapters:
        if adapter.architecture not in (base_arch, "unknown"):
            raise MismatchError(f"{use.name} is an {adapter.architecture} adapter and the base model is {base_arch}",
                                "Use a base model of the adapter's architecture")
        missing = [k for k in adapter.modules if k not in layers]
        if missing:
            raise MismatchError(f"{use.name} adapts {len(missing)} layer(s) the base model does not have, "
                                f"e.g. {missing[0]}", "Use the base model the adapter was trained for")
        for key, module in adapter.modules.items():
            if tuple(layers[key].weight.shape) != tuple(module.weight_shape):
                raise MismatchError(f"{use.name}: layer {key} has shape {list(layers[key].weight.shape)} in the base "
                                    f"model but {list(module.weight_shape)} in the adapter",
                                    "Use the base model the adapter was trained for")
    fused = FusedAdapters([use for _, _, use in adapters], layers=layers)
    keys = dict.fromkeys(key for adapter, _, _ in adapters for key in adapter.modules)
    with torch.no_grad():
        for key in keys:  # one layer at a time: the sum of its deltas in float32, one rounding to its dtype
            target = layers[key].weight
            fused.originals[key] = target.detach().clone()
            total = target.float()
            for adapter, weight, _ in adapters:
                if key in adapter.modules:
                    total = total + weight * adapter.modules[key].delta(torch.float32).to(target.device)
            target.copy_(total.to(target.dtype))
    return fused


def _pipeline_architecture(pipe) -> str:
    from .pipelines import architecture_of

    return architecture_of(pipe.unet, 2 if getattr(pipe, "text_encoder_2", None) is not None else 1)


def _quote(value: str) -> str:
    """A1111 quotes a parameter value that contains a comma, colon or newline (as JSON)."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n\"") else value


def infotext(settings: GenerationSettings, adapters: Sequence[AdapterUse] = (), *, model: str | None = None,
             extra: dict[str, Any] | None = None) -> str:
    """The A1111 ``parameters`` text: prompt (with ``<lora:name:weight>`` tags), negative prompt, settings line."""
    prompt = settings.prompt
    tags = [f"<lora:{use.name}:{use.weight:g}>" for use in adapters if f"<lora:{use.name}:" not in prompt]
    if tags:
        prompt = f"{prompt} {' '.join(tags)}" if prompt else " ".join(tags)
    lines = [prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    fields: dict[str, Any] = {"Steps": settings.steps, "Sampler": settings.sampler or "Default",
                              "CFG scale": f"{settings.guidance_scale:g}", "Seed": settings.seed,
                              "Size": f"{settings.width}x{settings.height}"}
    if model:
        fields["Model"] = model
    hashed = [f"{use.name}: {use.a1111_hash}" for use in adapters if use.a1111_hash]
    if hashed:
        fields["Lora hashes"] = ", ".join(hashed)
    fields.update(extra or {})
    fields["Version"] = f"lorareg {__version__}"
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in fields.items()))
    return "\n".join(lines)


def render(pipe, settings: GenerationSettings, seeds: Sequence[int],
           progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
    """One image per seed, each from its own CPU generator (so a seed gives the same image on any device)."""
    import torch

    settings.check(getattr(pipe, "vae_scale_factor", 8))
    pipe.set_progress_bar_config(disable=True)
    images = []
    for done, seed in enumerate(seeds, 1):
        generator = torch.Generator("cpu").manual_seed(int(seed))
        result = pipe(prompt=settings.prompt, negative_prompt=settings.negative_prompt or None,
                      num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                      width=settings.width, height=settings.height, generator=generator, output_type="pil")
        images.append(result.images[0])
        if progress:
            progress(done, len(seeds))
    return images


def save_png(image: Image.Image, path: Path, parameters: str, details: dict[str, Any] | None = None) -> Path:
    """Write ``image`` as a PNG with the A1111 ``parameters`` chunk (and a ``lorareg`` JSON chunk), atomically."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    if details is not None:
        info.add_text("lorareg", json.dumps(details, ensure_ascii=False, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def next_index(folder: Path) -> int:
    """The next free A1111-style image number in ``folder`` (files are ``NNNNN-seed.png``)."""
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"^(\d{5,})-", p.name))] \
        if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def read_parameters(path: str | Path) -> str | None:
    """The A1111 ``parameters`` text of a PNG (None if it has none)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.text.get("parameters") if hasattr(image, "text") else image.info.get("parameters")


def adapter_use(adapter: LoraAdapter, weight: float, name: str | None = None) -> AdapterUse:
    """How an adapter read from a file is named and hashed in the infotext."""
    path = adapter.source_path
    hashes = _file_hashes(path) if path is not None and path.is_file() else None
    if name is None:
        name = path.stem if path is not None and path.is_file() else (path.name if path is not None else "lora")
    return AdapterUse(name, float(weight), path, hashes.a1111 if hashes else None, hashes.sha256 if hashes else None)


def _file_hashes(path: Path) -> FileHashes | None:
    from .errors import CorruptFileError
    from .files.hashes import hash_file

    try:
        return hash_file(path)
    except (CorruptFileError, OSError):  # a pickle file, or one that changed: named without a hash
        return None


@dataclass
class GenerationResult:
    """What :func:`generate` wrote."""

    images: list[GeneratedImage]
    adapters: list[AdapterUse]
    settings: GenerationSettings
    base_model: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``--json``."""
        return {"base_model": self.base_model, "prompt": self.settings.prompt,
                "images": [{"path": str(g.path), "seed": g.seed} for g in self.images],
                "adapters": [a.to_dict() for a in self.adapters]}


def generate(base_model: str | Path, prompt: str, adapters: Sequence[tuple[str | Path | LoraAdapter, float]] = (), *,
             names: Sequence[str | None] | None = None, output_dir: str | Path = "samples", num_samples: int = 1,
             seed: int = 0, steps: int = 20, guidance_scale: float = 7.0, width: int | None = None,
             height: int | None = None, negative_prompt: str = "", scheduler: str | None = None,
             device: str | None = None, progress: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Load ``base_model`` once, fuse ``adapters`` (path or adapter, weight), render ``num_samples`` PNGs.

    Image ``i`` uses seed ``seed + i`` and is written to ``output_dir/NNNNN-<seed>.png``.
    """
    import torch

    from .formats import load_adapter
    from .pipelines import load_base_model

    if num_samples < 1:
        raise InvalidArgumentError(f"num_samples must be at least 1 (got {num_samples})")
    loaded = [(a if not isinstance(a, (str, Path)) else load_adapter(a), float(w)) for a, w in adapters]
    names = list(names) if names is not None else [None] * len(loaded)
    base = load_base_model(base_model)
    pipe = base.pipeline()
    pipe.scheduler = scheduler_for(pipe, scheduler)
    default_size = base.unet.config.sample_size * base.vae_scale_factor
    settings = GenerationSettings(prompt, negative_prompt, steps, guidance_scale, width or default_size,
                                  height or default_size, seed, sampler_name(pipe.scheduler))
    settings.check(base.vae_scale_factor)
    uses = [adapter_use(adapter, weight, name) for (adapter, weight), name in zip(loaded, names)]
    fuse_adapters(pipe, [(adapter, weight, use) for (adapter, weight), use in zip(loaded, uses)])
    if device:
        pipe.to(torch.device(device))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    index = next_index(output_dir)
    seeds = [seed + i for i in range(num_samples)]
    model_name = Path(str(base_model)).name
    results = []
    for i, image_seed in enumerate(seeds):
        one = GenerationSettings(**{**settings.__dict__, "seed": image_seed})
        image = render(pipe, one, [image_seed])[0]
        text = infotext(one, uses, model=model_name)
        details = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": image_seed, "steps": steps,
                   "guidance_scale": guidance_scale, "width": one.width, "height": one.height,
                   "scheduler": one.sampler, "base_model": str(base_model), "adapters": [u.to_dict() for u in uses],
                   "tool": f"lorareg {__version__}"}
        path = save_png(image, output_dir / f"{index + i:05d}-{image_seed}.png", text, details)
        results.append(GeneratedImage(image, image_seed, text, path))
        if progress:
            progress(i + 1, num_samples)
    return GenerationResult(results, uses, settings, str(base_model))
