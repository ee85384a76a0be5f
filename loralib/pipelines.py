"""Loading a base model pipeline for training or generation: a Hub id, a local diffusers folder or a single file.

The result is a :class:`BaseModel` holding the pipeline's parts (denoiser — a UNet, or the
transformer of Flux.1 and SD3 —, VAE, text encoders, tokenizers, scheduler) and the architecture
they form (sd1, sd2, sdxl, flux, sd3, sd35-medium, sd35-large). Problems become one
clear :class:`~loralib.errors.LoraError`: a missing path, a Hub id without network, a pickle file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .architectures import ARCHITECTURES, FLUX, SD1, SD2, SD3, SD35_LARGE, SD35_MEDIUM, SDXL, TRANSFORMER, UNET
from .errors import InputNotFoundError, InvalidArgumentError, LoraError, UnsafeFileError
from .files import is_pickle
from .hub_ids import is_repo_ref, parse_repo_ref


@dataclass
class BaseModel:
    """The parts of a diffusion pipeline that training and generation use.

    ``denoiser`` is the UNet (SD1.x/SD2.x/SDXL) or the transformer (Flux.1, SD3/SD3.5); ``unet`` is
    another name for it.
    """

    source: str
    architecture: str
    denoiser: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler: Any
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def unet(self) -> Any:
        """The denoiser (named for the SD families, where it is a UNet)."""
        return self.denoiser

    @property
    def denoiser_name(self) -> str:
        """The denoiser's pipeline component: ``unet`` or ``transformer``."""
        return ARCHITECTURES[self.architecture].denoiser

    @property
    def family(self) -> str:
        """``sd``, ``flux`` or ``sd3`` (see :mod:`loralib.architectures`)."""
        return ARCHITECTURES[self.architecture].family

    @property
    def is_flow(self) -> bool:
        """True for the flow-matching transformer families (Flux.1, SD3/SD3.5)."""
        return self.denoiser_name == TRANSFORMER

    @property
    def is_sdxl(self) -> bool:
        """True for SDXL (two text encoders, size and crop conditioning)."""
        return self.architecture == SDXL.name

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for every Stable Diffusion VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def components(self) -> dict[str, Any]:
        """The modules by their pipeline names (``unet`` or ``transformer``, ``text_encoder``, ``text_encoder_2``…)."""
        parts = {self.denoiser_name: self.denoiser}
        for name, encoder in zip(("text_encoder", "text_encoder_2", "text_encoder_3"), self.text_encoders):
            parts[name] = encoder
        return parts

    def pipeline(self, *, unet=None, text_encoders: list[Any] | None = None, scheduler=None):
        """A diffusers text-to-image pipeline over these parts (optionally with replaced ones; ``unet`` replaces
        the denoiser, a UNet or a transformer)."""
        import diffusers
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        unet = unet if unet is not None else self.denoiser
        encoders = text_encoders if text_encoders is not None else self.text_encoders
        scheduler = scheduler if scheduler is not None else self.scheduler
        if self.is_flow:
            parts: dict[str, Any] = {"transformer": unet, "vae": self.vae, "scheduler": scheduler}
            for index, (encoder, tokenizer) in enumerate(zip(encoders, self.tokenizers)):
                suffix = f"_{index + 1}" if index else ""
                parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = encoder, tokenizer
            return getattr(diffusers, ARCHITECTURES[self.architecture].pipeline_class)(**parts)
        if self.is_sdxl:
            return StableDiffusionXLPipeline(vae=self.vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                             tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1],
                                             unet=unet, scheduler=scheduler)
        return StableDiffusionPipeline(vae=self.vae, text_encoder=encoders[0], tokenizer=self.tokenizers[0],
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)


def architecture_of(unet, text_encoder_count: int) -> str:
    """The architecture of a denoiser: sd1, sd2 or sdxl from a UNet's config and the number of text
    encoders; flux, sd3, sd35-medium or sd35-large from a transformer's class and config."""
    class_name = type(unet).__name__
    if class_name == FLUX.denoiser_class:
        return FLUX.name
    if class_name == SD3.denoiser_class:
        if unet.config.get("dual_attention_layers"):
            return SD35_MEDIUM.name
        return SD35_LARGE.name if unet.config.get("qk_norm") else SD3.name
    if text_encoder_count > 1 or unet.config.get("addition_embed_type") == "text_time":
        return SDXL.name
    return SD2.name if unet.config.cross_attention_dim == 1024 else SD1.name


def _dtype_argument(dtype) -> dict[str, Any]:
    """Loading in float32 is the default; naming it only draws a deprecation warning from new diffusers."""
    import torch

    return {} if dtype in (None, torch.float32) else {"torch_dtype": dtype}


def _from_pipeline(source: str, pipe) -> BaseModel:
    encoders = [e for e in (getattr(pipe, f"text_encoder{s}", None) for s in ("", "_2", "_3")) if e is not None]
    tokenizers = [t for t in (getattr(pipe, f"tokenizer{s}", None) for s in ("", "_2", "_3")) if t is not None]
    denoiser = getattr(pipe, UNET, None) or getattr(pipe, TRANSFORMER, None)
    return BaseModel(source, architecture_of(denoiser, len(encoders)), denoiser, pipe.vae, encoders, tokenizers,
                     pipe.scheduler)


_FLOW_PIPELINES = {a.pipeline_class for a in (FLUX, SD3)}


def _pipeline_class(model_index: dict):
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if model_index.get("_class_name") in _FLOW_PIPELINES:
        return getattr(diffusers, model_index["_class_name"])
    return StableDiffusionXLPipeline if "text_encoder_2" in model_index else StableDiffusionPipeline


def _has_parts(model_index: dict) -> bool:
    """A pipeline lorareg can use: a UNet and a text encoder, or a Flux.1/SD3 pipeline's transformer."""
    if model_index.get("_class_name") in _FLOW_PIPELINES:
        return "transformer" in model_index and "text_encoder" in model_index
    return "unet" in model_index and "text_encoder" in model_index


def _load_folder(folder: Path, source: str, dtype):
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise InvalidArgumentError(f"{folder} is not a diffusers model folder (it has no model_index.json)",
                                   "Give a diffusers folder, a single-file .safetensors checkpoint or a Hub id")
    model_index = json.loads(index_file.read_text())
    if not _has_parts(model_index):
        raise InvalidArgumentError(f"{folder} holds a {model_index.get('_class_name', 'pipeline')} without a UNet "
                                   "or Flux.1/SD3 transformer, and text encoder",
                                   "lorareg uses SD1.x, SD2.x, SDXL, Flux.1 and SD3/SD3.5 models")
    if model_index.get("_class_name") not in _FLOW_PIPELINES:
        return _from_pipeline(source, _load_parts(folder, model_index, dtype))
    cls = _pipeline_class(model_index)
    kwargs = _dtype_argument(dtype)
    if "safety_checker" in model_index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return _from_pipeline(source, cls.from_pretrained(folder, **kwargs))


#: The parts of an SD1/SD2/SDXL folder lorareg uses (no safety checker, feature extractor or image encoder).
_SD_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _load_parts(folder: Path, model_index: dict, dtype) -> SimpleNamespace:
    """Each part of an SD folder loaded with the class its model_index.json names, as the pipeline's
    ``from_pretrained`` does, without importing the pipeline classes (and the guiders, image processors
    and safety checker they bring: about a megabyte that training never uses)."""
    parts = {}
    for name in _SD_PARTS:
        library = (model_index.get(name) or (None,))[0]
        if library is None:
            continue
        cls = _component_class(model_index, name)
        kwargs = {}
        if name not in ("tokenizer", "tokenizer_2", "scheduler"):
            kwargs = _dtype_argument(dtype)
            if library == "transformers" and kwargs:  # transformers names it dtype (torch_dtype is deprecated)
                kwargs = {"dtype": kwargs["torch_dtype"]}
        parts[name] = cls.from_pretrained(folder / name, **kwargs)
    return SimpleNamespace(**parts)


def _load_transformer_file(path: Path, info, components: Path | None, dtype) -> BaseModel:
    """A Flux.1/SD3 transformer file, with the pipeline's other parts from the folder ``components``.

    The parts an all-in-one file holds as well (VAE, text encoders) are read from the file, so the
    folder needs only their configurations; tokenizers and the scheduler always come from it.
    """
    from .transformer_files import load_file_part, load_transformer_file

    family = ARCHITECTURES[info.architecture]
    inside = info.components()
    if components is None:
        held = f" and its {', '.join(inside)}" if inside else \
            (" (lorareg reads no other part of it)" if info.has_other_parts else "")
        raise InvalidArgumentError(
            f"{path.name} holds the {family.title} transformer{held}; the tokenizers, scheduler, configurations "
            "and any part the file lacks come from a diffusers folder",
            f"Pass --base-components (config key base_components) naming a {family.title} diffusers folder")
    components = Path(components).expanduser()
    index_file = components / "model_index.json"
    model_index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    if model_index.get("_class_name") != family.pipeline_class:
        raise InvalidArgumentError(f"base components {components} are not a {family.title} diffusers folder "
                                   f"(it holds {model_index.get('_class_name', 'no model_index.json')})",
                                   f"Name a folder with a {family.pipeline_class}'s VAE and text encoders")
    transformer = load_transformer_file(path, info, dtype)
    parts = {name: load_file_part(path, part, _component_class(model_index, name), components / name, dtype)
             for name, part in inside.items() if name in model_index}
    cls = _pipeline_class(model_index)
    try:
        pipe = cls.from_pretrained(components, transformer=transformer, **parts, **_dtype_argument(dtype))
    except OSError as exc:  # a part neither the file nor the folder has weights for
        raise InvalidArgumentError(f"base components {components} lack weights the file {path.name} does not hold "
                                   f"either ({str(exc).splitlines()[0][:160]})",
                                   "Name a complete diffusers folder of the same model") from exc
    return _from_pipeline(str(path), pipe)


def _component_class(model_index: dict, name: str):
    """The class a folder's model_index.json names for component ``name``."""
    import importlib

    library, class_name = model_index[name][:2]
    return getattr(importlib.import_module(library), class_name)


def _load_single_file(path: Path, dtype, components: Path | None = None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .files.header import read_header
    from .transformer_files import inspect_transformer_file

    if is_pickle(path):
        raise UnsafeFileError(f"{path.name} is a pickle checkpoint; loading it would run code stored in it",
                              "Use the .safetensors version of the model")
    header = read_header(path)
    info = inspect_transformer_file(path, {k: tuple(v.shape) for k, v in header.tensors.items()})
    if info is not None:
        return _load_transformer_file(path, info, components, dtype)
    names = list(header.tensors)
    if not any(n.startswith("model.diffusion_model.") for n in names):
        raise InvalidArgumentError(f"{path.name} is not a single-file Stable Diffusion checkpoint (it has no "
                                   "model.diffusion_model.* weights)", "Give a full model, not an adapter or a part")
    cls = StableDiffusionXLPipeline if any(n.startswith("conditioner.embedders.1.") for n in names) \
        else StableDiffusionPipeline
    try:
        return _from_pipeline(str(path), cls.from_single_file(path, **_dtype_argument(dtype)))
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise InputNotFoundError(
            f"could not load the single-file checkpoint {path.name}: diffusers needs the model's configuration "
            f"from the Hugging Face Hub{' and HF_HUB_OFFLINE is set' if offline else ''} ({type(exc).__name__})",
            "Run once with network access so the configuration is cached, or use a diffusers folder") from exc


def _load_hub(reference: str, dtype):
    from diffusers import DiffusionPipeline

    repo_id, revision = parse_repo_ref(reference)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        from huggingface_hub import hf_hub_download

        index = json.loads(Path(hf_hub_download(repo_id, "model_index.json", revision=revision,
                                                     local_files_only=offline)).read_text())
    except Exception as exc:
        reason = "there is no network access (HF_HUB_OFFLINE is set) and it is not in the Hugging Face cache" \
            if offline else f"it could not be downloaded ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        raise InputNotFoundError(f"cannot load the base model {reference} from the Hub: {reason}",
                                 "Connect to the network, or give a local diffusers folder or .safetensors file "
                                 "(lorareg tiny-model builds a tiny one offline)") from exc
    cls = _pipeline_class(index) if _has_parts(index) else DiffusionPipeline
    kwargs = _dtype_argument(dtype)
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return _from_pipeline(reference, cls.from_pretrained(repo_id, revision=revision, **kwargs))


def check_base_model(reference: str | Path, components: str | Path | None = None) -> None:
    """Check a base model reference without loading anything (and without torch), so a mistake is
    reported before the seconds that loading torch and diffusers take.

    A local folder must be a diffusers folder, a local file a ``.safetensors`` checkpoint; a Hub id
    is accepted, except with ``HF_HUB_OFFLINE`` set when it is not in the Hugging Face cache.
    ``components`` (for a transformer-only file) must be a diffusers folder.
    """
    if components is not None and not (Path(components).expanduser() / "model_index.json").is_file():
        raise InputNotFoundError(f"base components {components} is not a diffusers folder (no model_index.json)",
                                 "Check --base-components (config key base_components)")
    text = str(reference)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InvalidArgumentError(f"{path} is not a diffusers model folder (it has no model_index.json)",
                                       "Give a diffusers folder, a single-file .safetensors checkpoint or a Hub id")
        return
    if path.is_file():
        if is_pickle(path):
            raise UnsafeFileError(f"{path.name} is a pickle checkpoint; loading it would run code stored in it",
                                  "Use the .safetensors version of the model")
        return
    if not is_repo_ref(text) or text.startswith((".", "/", "~")):
        raise InputNotFoundError(f"base model {text} is not a folder, a file or a Hugging Face Hub id",
                                 "Check base_model (--base)")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, revision = parse_repo_ref(text)
        if not isinstance(try_to_load_from_cache(repo_id, "model_index.json", revision=revision), str):
            raise InputNotFoundError(
                f"cannot load the base model {text} from the Hub: there is no network access (HF_HUB_OFFLINE is set) "
                "and it is not in the Hugging Face cache",
                "Connect to the network, or give a local diffusers folder or .safetensors file "
                "(lorareg tiny-model builds a tiny one offline)")


def load_base_model(reference: str | Path, *, dtype=None, components: str | Path | None = None) -> BaseModel:
    """Load the base model at ``reference``: a local diffusers folder, a ``.safetensors`` file or a Hub id.

    ``dtype`` (a torch dtype) is the dtype of every loaded weight (default float32). A Flux.1 or
    SD3/SD3.5 transformer file (BFL / MMDiT names, bare or ComfyUI-prefixed) takes the pipeline's
    other parts from the diffusers folder ``components``.
    """
    import torch

    dtype = dtype or torch.float32
    text = str(reference)
    path = Path(text).expanduser()
    try:
        if path.is_dir():
            return _load_folder(path, str(path), dtype)
        if path.is_file():
            return _load_single_file(path, dtype, Path(components) if components else None)
    except LoraError:
        raise
    except Exception as exc:
        raise InvalidArgumentError(f"could not load the base model {text}: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
                                   "Check that it is a complete Stable Diffusion model") from exc
    if is_repo_ref(text) and not text.startswith((".", "/", "~")):
        return _load_hub(text, dtype)
    raise InputNotFoundError(f"base model {text} is not a folder, a file or a Hugging Face Hub id",
                             "Check base_model (--base)")
