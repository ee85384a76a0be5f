"""Rendering images with a base model and any number of LoRA adapters, the way A1111 records them.

The base model is loaded once; adapters are fused into its weights with their weights
(``W += weight · ΔW``, computed in float32 — for a LoRA the same result as diffusers'
``load_lora_weights`` + ``set_adapters`` + ``fuse_lora``, and it works for every module kind
lorareg reads: LoCon and CP-decomposed convs, LoHa and LoKr, which diffusers cannot load, full and
norm/bias differences, and DoRA, computed from the pipeline's own weights) and can be removed
again exactly.
Every PNG carries AUTOMATIC1111's ``parameters`` text chunk — prompt, negative prompt, steps,
sampler, CFG scale, seed, size, ``Model hash`` (:func:`model_hash`), ``Lora hashes`` — that A1111,
ComfyUI, Civitai and image viewers read, plus a ``lorareg`` chunk with the same facts as JSON. Image ``i`` uses seed ``seed + i``, and
the same seed always gives the same image.

Flux.1 and SD3/SD3.5 bases (flow matching) render through the same calls: their default sampler is
the model's own flow-matching Euler, ``guidance_scale`` is SD3's classifier-free guidance scale and
Flux.1's distilled guidance (recorded as Forge records it: ``Distilled CFG Scale``, with ``CFG scale: 1``),
and sizes are multiples of 16 (the VAE's 8 times the transformer's 2×2 patches).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgumentError, MismatchError
from .files.atomic import atomic_file
from .version import TOOL
from .vocabulary import SCHEDULERS

if TYPE_CHECKING:
    from PIL import Image

    from .adapter import LoraAdapter
    from .files.hashes import FileHashes

_A1111_NAMES = {cls: name for cls, extra, name in SCHEDULERS.values() if not extra}
# The flow-matching samplers of Flux.1 and SD3, by the sampler name that picks them (A1111/Forge call them the same).
FLOW_SCHEDULERS = {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler"}
_A1111_NAMES.update({cls: SCHEDULERS[name][2] for name, cls in FLOW_SCHEDULERS.items()})
# Defaults where a family differs from SD: (guidance scale, steps) as the model's authors publish them.
DEFAULT_GUIDANCE = {"sd": 7.0, "flux": 3.5, "sd3": 7.0}


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
    distilled_guidance: bool = False  # Flux.1: guidance_scale is the model's guidance input, not CFG

    def check(self, vae_scale_factor: int = 8) -> None:
        """Refuse values no pipeline can use (sides must be multiples of ``vae_scale_factor``: 8 for SD, 16 for
        Flux.1 and SD3, whose transformers take 2×2 patches of latents)."""
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
    originals: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)  # (layer, "weight"|"bias")
    layers: dict[str, Any] = field(default_factory=dict, repr=False)

    def remove(self) -> None:
        """Put back the base weights and biases that fusing changed."""
        import torch

        with torch.no_grad():
            for (key, parameter), value in self.originals.items():
                getattr(self.layers[key], parameter).copy_(value)
        self.originals.clear()


def scheduler_for(pipe, name: str | None):
    """The pipeline's scheduler, or the named one built from its config.

    Flux.1 and SD3 denoise by flow matching: only ``euler`` and ``heun`` (their flow-matching
    versions) fit them.
    """
    import diffusers

    if not name:
        return pipe.scheduler
    if name not in SCHEDULERS:
        raise InvalidArgumentError(f"unknown scheduler {name!r}", f"Choose one of {', '.join(SCHEDULERS)}")
    if getattr(pipe, "transformer", None) is not None:
        if name not in FLOW_SCHEDULERS:
            raise InvalidArgumentError(f"the {name} sampler predicts noise, and Flux.1 and SD3 models are flow-matching "
                                       "models", f"Use --scheduler {' or '.join(FLOW_SCHEDULERS)}, or leave it out")
        return getattr(diffusers, FLOW_SCHEDULERS[name]).from_config(pipe.scheduler.config)
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

    from .architectures import family_of
    from .base_model import pipeline_layers

    layers = pipeline_layers(pipe, norms=True)
    base_arch = _pipeline_architecture(pipe)
    for adapter, _, use in adapters:
        # SD3 and SD3.5 differ in widths and modules, which the layer checks below catch; a tiny model's
        # SD3-family adapter cannot say which it is
        same_family = family_of(base_arch) == family_of(adapter.architecture) != "sd"
        if adapter.architecture not in (base_arch, "unknown") and not same_family:
            raise MismatchError(f"{use.name} is an {adapter.architecture} adapter and the base model is {base_arch}",
                                "Use a base model of the adapter's architecture")
        missing = [k for k in adapter.modules if k not in layers]
        if missing:
            raise MismatchError(f"{use.name} adapts {len(missing)} layer(s) the base model does not have, "
                                f"e.g. {missing[0]}", "Use the base model the adapter was trained for")
        for key, module in adapter.modules.items():
            problem = _misfit(layers[key], module)
            if problem:
                raise MismatchError(f"{use.name}: layer {key} {problem}", "Use the base model the adapter was trained for")
    fused = FusedAdapters([use for _, _, use in adapters], layers=layers)
    keys = dict.fromkeys(key for adapter, _, _ in adapters for key in adapter.modules)
    with torch.no_grad():
        for key in keys:  # one layer at a time: the sum of its deltas in float32, one rounding to its dtype
            layer = layers[key]
            weight_parts, bias_parts = [], []
            for adapter, weight, _ in adapters:
                module = adapter.modules.get(key)
                if module is None:
                    continue
                base = layer.weight.detach().float().cpu() if module.needs_base else None
                delta = module.delta(torch.float32, base)
                if delta is not None:
                    weight_parts.append(weight * delta.reshape(layer.weight.shape))
                bias = module.bias_delta(torch.float32)
                if bias is not None:
                    bias_parts.append(weight * bias)
            for parameter, parts in (("weight", weight_parts), ("bias", bias_parts)):
                if parts:
                    _add(fused, key, layer, parameter, parts)
    return fused


def _misfit(layer, module) -> str | None:
    """Why ``module`` cannot change ``layer`` (None when it fits)."""
    if module.is_matrix:
        have, want = tuple(layer.weight.shape), tuple(module.weight_shape)
        flat = lambda shape: (shape[0], math.prod(shape[1:]))  # noqa: E731 a 1x1 conv takes a Linear's factors
        if layer.weight.ndim < 2 or flat(have) != flat(want):
            return f"has shape {list(have)} in the base model but {list(want)} in the adapter"
    elif module.delta() is not None and layer.weight.shape != module.delta().shape:
        return f"has {layer.weight.numel()} weights in the base model but the adapter changes {module.delta().numel()}"
    bias = module.bias_delta()
    if bias is not None and (getattr(layer, "bias", None) is None or layer.bias.shape != bias.shape):
        return "has no bias of the adapter's width in the base model"
    return None


def _add(fused: FusedAdapters, key: str, layer, parameter: str, parts: list) -> None:
    """Add the deltas to one parameter of a layer in float32, keeping the original for :meth:`FusedAdapters.remove`."""
    target = getattr(layer, parameter)
    fused.originals[key, parameter] = target.detach().clone()
    total = target.float()
    for part in parts:
        total = total + part.to(target.device)
    target.copy_(total.to(target.dtype))


def _pipeline_architecture(pipe) -> str:
    from .pipelines import architecture_of

    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return architecture_of(denoiser, 2 if getattr(pipe, "text_encoder_2", None) is not None else 1)


def _quote(value: str) -> str:
    """A1111 quotes a parameter value that contains a comma, colon or newline (as JSON)."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n\"") else value


def model_hash(base_model: str | os.PathLike) -> str | None:
    """The ``Model hash`` of a base model as A1111 writes it: the first 10 hex digits (AutoV2) of the
    SHA-256 of a single-file checkpoint. For a diffusers folder (which A1111 cannot load, so has no
    hash of its own) it is the SHA-256 of a list of its files' relative paths and SHA-256s. A Hub id
    is hashed through its cached snapshot; None when nothing local can be hashed.
    """
    from .files.hashes import file_sha256

    path = Path(str(base_model)).expanduser()
    if not path.exists():
        try:
            from huggingface_hub import snapshot_download

            from .hub_ids import parse_repo_ref

            repo_id, revision = parse_repo_ref(str(base_model))
            path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:  # not a Hub id, or not cached: no hash
            return None
    if path.is_file():
        return file_sha256(path)[:10]
    files = sorted(f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts))
    listing = "".join(f"{f.relative_to(path).as_posix()}\0{file_sha256(f)}\n" for f in files)
    import hashlib

    return hashlib.sha256(listing.encode("utf-8")).hexdigest()[:10]


def infotext(settings: GenerationSettings, adapters: Sequence[AdapterUse] = (), *, model: str | None = None,
             extra: dict[str, Any] | None = None, model_hash: str | None = None) -> str:
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
    if settings.distilled_guidance:  # Forge's fields for Flux.1: no classifier-free guidance, a guidance input
        fields["CFG scale"] = "1"
        fields["Distilled CFG Scale"] = f"{settings.guidance_scale:g}"
    if model_hash:
        fields["Model hash"] = model_hash
    if model:
        fields["Model"] = model
    hashed = [f"{use.name}: {use.a1111_hash}" for use in adapters if use.a1111_hash]
    if hashed:
        fields["Lora hashes"] = ", ".join(hashed)
    fields.update(extra or {})
    fields["Version"] = TOOL
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in fields.items()))
    return "\n".join(lines)


def pixel_multiple(pipe) -> int:
    """What image sides must be a multiple of: the VAE's scale factor, times 2 for the transformers of Flux.1
    (2×2 packed latents) and SD3 (2×2 patches)."""
    factor = getattr(pipe, "vae_scale_factor", 8)
    return factor * 2 if getattr(pipe, "transformer", None) is not None else factor


def render(pipe, settings: GenerationSettings, seeds: Sequence[int],
           progress: Callable[[int, int], None] | None = None, *, output_type: str = "pil") -> list[Image.Image]:
    """One image per seed, each from its own CPU generator (so a seed gives the same image on any device).

    ``output_type`` is diffusers': ``"pil"``, or ``"latent"`` for the denoised latents (tests compare them).
    """
    import torch

    settings.check(pixel_multiple(pipe))
    pipe.set_progress_bar_config(disable=True)
    images = []
    for done, seed in enumerate(seeds, 1):
        generator = torch.Generator("cpu").manual_seed(int(seed))
        result = pipe(prompt=settings.prompt, negative_prompt=settings.negative_prompt or None,
                      num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                      width=settings.width, height=settings.height, generator=generator, output_type=output_type)
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
    from .errors import LoraError
    from .files.hashes import hash_file

    try:
        return hash_file(path)
    except (LoraError, OSError):  # a pickle file, or one that changed: named without a hash
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


def default_size(base) -> int:
    """A base model's native image side: the UNet's sample size in pixels; for Flux.1 and SD3, the VAE's
    (1024 for the full-size models)."""
    if base.is_flow:
        return int(base.vae.config.sample_size)
    return base.denoiser.config.sample_size * base.vae_scale_factor


def generate(base_model: str | Path, prompt: str, adapters: Sequence[tuple[str | Path | LoraAdapter, float]] = (), *,
             names: Sequence[str | None] | None = None, output_dir: str | Path = "samples", num_samples: int = 1,
             seed: int = 0, steps: int = 20, guidance_scale: float | None = None, width: int | None = None,
             height: int | None = None, negative_prompt: str = "", scheduler: str | None = None,
             device: str | None = None, progress: Callable[[int, int], None] | None = None,
             base_components: str | Path | None = None) -> GenerationResult:
    """Load ``base_model`` once, fuse ``adapters`` (path or adapter, weight), render ``num_samples`` PNGs.

    Image ``i`` uses seed ``seed + i`` and is written to ``output_dir/NNNNN-<seed>.png``. ``guidance_scale``
    defaults to the family's (7 for SD and SD3, 3.5 for Flux.1's distilled guidance); ``width`` and
    ``height`` to the model's. ``base_components`` is the diffusers folder that completes a
    transformer-only Flux.1/SD3 ``base_model`` file.
    """
    import torch

    from .files.hashes import Deferred
    from .formats import load_adapter
    from .pipelines import load_base_model

    if num_samples < 1:
        raise InvalidArgumentError(f"num_samples must be at least 1 (got {num_samples})")
    base_hash = Deferred(model_hash, base_model)  # hashed while the model loads
    loaded = [(a if not isinstance(a, (str, Path)) else load_adapter(a), float(w)) for a, w in adapters]
    names = list(names) if names is not None else [None] * len(loaded)
    base = load_base_model(base_model, components=base_components)
    pipe = base.pipeline()
    pipe.scheduler = scheduler_for(pipe, scheduler)
    if base.family == "flux" and negative_prompt:
        raise InvalidArgumentError("Flux.1 is guidance-distilled and takes no negative prompt",
                                   "Leave out the negative prompt (--negative)")
    if guidance_scale is None:
        guidance_scale = DEFAULT_GUIDANCE[base.family]
    settings = GenerationSettings(prompt, negative_prompt, steps, guidance_scale, width or default_size(base),
                                  height or default_size(base), seed, sampler_name(pipe.scheduler),
                                  distilled_guidance=base.family == "flux")
    settings.check(pixel_multiple(pipe))
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
        text = infotext(one, uses, model=model_name, model_hash=base_hash.result())
        details = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": image_seed, "steps": steps,
                   "guidance_scale": guidance_scale, "width": one.width, "height": one.height,
                   "scheduler": one.sampler, "base_model": str(base_model), "model_hash": base_hash.result(),
                   "adapters": [u.to_dict() for u in uses], "tool": TOOL}
        path = save_png(image, output_dir / f"{index + i:05d}-{image_seed}.png", text, details)
        results.append(GeneratedImage(image, image_seed, text, path))
        if progress:
            progress(i + 1, num_samples)
    return GenerationResult(results, uses, settings, str(base_model))
