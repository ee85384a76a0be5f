"""A base model on disk, addressed by lorareg's internal layer keys.

Three layouts are read: a diffusers folder (``unet/`` or ``transformer/``, ``text_encoder/``,
``text_encoder_2/``, ``text_encoder_3/`` with safetensors weights, sharded or not, any variant), a
diffusers transformer folder on its own (``config.json`` + ``diffusion_pytorch_model*.safetensors``),
and a single-file checkpoint in the original layout, as A1111 and ComfyUI load it. Single files
of SD1.x/SD2.x/SDXL:

- UNet: ``model.diffusion_model.<SGM path>.weight`` (translated with :mod:`loralib.naming.sgm`;
  the block layout is read from the checkpoint's own key names);
- CLIP text encoders: ``cond_stage_model.transformer.text_model.…`` (SD1) and
  ``conditioner.embedders.0.transformer.text_model.…`` (SDXL's first);
- OpenCLIP text encoders: ``cond_stage_model.model.transformer.resblocks.N.…`` (SD2) and
  ``conditioner.embedders.1.model.…`` (SDXL's second), whose attention keeps q, k and v stacked
  in one ``in_proj_weight``; each projection is a block of rows of it.

Single files of Flux.1 and SD3 (BFL's ``flux1-dev.safetensors`` without prefix, ComfyUI's with
``model.diffusion_model.``): the transformer in BFL or MMDiT names, whose fused ``qkv``/``linear1``
weights hold several diffusers layers as blocks of rows and whose final modulation stores its
halves swapped (:mod:`loralib.naming.flux`, :mod:`loralib.naming.sd3`); text encoders bundled as
``text_encoders.<clip_l|clip_g|t5xxl>.transformer.…``.

Linear and Conv2d weights are addressed by layer key (the layers a LoRA can adapt; embeddings such
as T5's ``shared`` and relative attention biases are not); with ``vectors=True`` also biases and
norm-layer weights, as :func:`vector_key` ``(layer, "bias")`` (what full-rank and norm
differences change; not OpenCLIP's, nor the norms of Flux/SD3 single files). Nothing here loads a
tensor until asked, and reading one layer reads only its bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ..architectures import (
    DENOISERS,
    FLUX_FAMILY,
    SD3_FAMILY,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ENCODER_3,
    TRANSFORMER,
    UNET,
)
from ..errors import InputNotFoundError, InvalidArgumentError, NotALoraError, UnsafeFileError
from ..files import is_pickle
from ..files.header import SafetensorsHeader, read_header
from ..layers import LayerShape
from ..naming import internal_key
from ..naming.sgm import UNetLayout, sgm_to_diffusers

DIFFUSERS_COMPONENTS = (UNET, TRANSFORMER, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3)
UNET_PREFIX = "model.diffusion_model."
_NATIVE_ROOT = re.compile(r"^(?:model\.diffusion_model\.)?(double_blocks|single_blocks|joint_blocks)\.")
_BUNDLED_TEXT = re.compile(r"^text_encoders\.(clip_l|clip_g|t5xxl)\.transformer\.(.+)\.weight$")
CLIP_PREFIXES = {"cond_stage_model.transformer.": TEXT_ENCODER, "conditioner.embedders.0.transformer.": TEXT_ENCODER}
OPEN_CLIP_PREFIXES = {"cond_stage_model.model.": TEXT_ENCODER, "conditioner.embedders.1.model.": TEXT_ENCODER_2}
_OPEN_CLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|"
                              r"mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
_OPEN_CLIP_NAMES = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
                    "mlp.c_proj.weight": "mlp.fc2"}
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


@dataclass(frozen=True)
class Slot:
    """Where one layer's weight is stored: a tensor of a file, or a block of its rows."""

    file: Path
    name: str
    shape: tuple[int, ...]  # the layer's weight shape
    dtype: str  # safetensors dtype name
    rows: tuple[int, int] | None = None
    swap: bool = False  # stored with the two halves of its rows exchanged (BFL/SAI final modulation)


def vector_key(key: str, parameter: str) -> str:
    """The slot key of a layer's bias (``parameter="bias"``) or a norm layer's 1-D weight (``"weight"``)."""
    return f"{key}:{parameter}"


def _vector(name: str, shape: tuple[int, ...]) -> tuple[str, str] | None:
    """``(path, parameter)`` of a bias or a 1-D weight, else None."""
    for parameter in ("bias", "weight"):
        if name.endswith("." + parameter) and (parameter == "bias" or len(shape) == 1):
            return name[: -len(parameter) - 1], parameter
    return None


def layer_shape(shape: tuple[int, ...]) -> LayerShape:
    """The :class:`LayerShape` of a stored Linear or Conv2d weight."""
    if len(shape) == 4:
        return LayerShape(shape[0], shape[1], (shape[2], shape[3]))
    return LayerShape(shape[0], shape[1], None)


def _text_key(component: str, path: str) -> str | None:
    """The internal key of a text-encoder layer; None for embeddings, which no LoRA adapts."""
    if "embeddings." in path or path.endswith(("embedding", "shared", "embed_tokens", "relative_attention_bias")):
        return None
    return internal_key(component, path)


def diffusers_slots(component: str, header: SafetensorsHeader, vectors: bool = False) -> dict[str, Slot]:
    """The adaptable layers in one weight file of a diffusers component folder (and their vectors)."""
    slots = {}
    for name, info in header.tensors.items():
        if vectors and (found := _vector(name, tuple(info.shape))):
            path, parameter = found
            key = f"{component}.{path}" if component in DENOISERS else _text_key(component, path)
            if key is not None:
                slots[vector_key(key, parameter)] = Slot(header.path, name, tuple(info.shape), info.dtype)
            continue
        if not name.endswith(".weight") or len(info.shape) not in ((2, 4) if component in DENOISERS else (2,)):
            continue
        path = name[: -len(".weight")]
        key = f"{component}.{path}" if component in DENOISERS else _text_key(component, path)
        if key is not None:
            slots[key] = Slot(header.path, name, tuple(info.shape), info.dtype)
    return slots


def infer_layout(names: list[str]) -> UNetLayout:
    """The UNet block layout of an original-layout checkpoint, from its key names alone."""
    inputs: dict[int, set[int]] = {}
    downsamplers, up_attention = [], set()
    for name in names:
        if match := re.match(re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.(\d+)\.(\w+)", name):
            n, m = int(match.group(1)), int(match.group(2))
            inputs.setdefault(n, set()).add(m)
            if match.group(3) == "op":
                downsamplers.append(n)
        elif match := re.match(re.escape(UNET_PREFIX) + r"output_blocks\.(\d+)\.1\.transformer_blocks", name):
            up_attention.add(int(match.group(1)))
    if not downsamplers:
        raise InvalidArgumentError("the checkpoint's UNet has no downsampling layers; its block layout is unknown")
    layers = min(downsamplers) - 1
    per_block = layers + 1
    blocks = (max(inputs) - 1) // per_block + 1
    down_attention = tuple(any(1 in inputs.get(1 + b * per_block + j, ()) for j in range(layers)) for b in range(blocks))
    up_attention_blocks = tuple(any(b * per_block + j in up_attention for j in range(per_block)) for b in range(blocks))
    return UNetLayout(layers, down_attention, up_attention_blocks)


def is_native_transformer(names: list[str]) -> bool:
    """True for a single file holding a Flux.1 (BFL names) or SD3 (MMDiT names) transformer."""
    return any(_NATIVE_ROOT.match(n) for n in names)


def native_slots(header: SafetensorsHeader, vectors: bool = False) -> dict[str, Slot]:
    """The adaptable layers of a Flux.1 or SD3 single file (original names, bundled text encoders),
    and with ``vectors`` the biases of the transformer's layers (a fused layer's as blocks of rows)."""
    from ..formats.comfyui import text_component
    from ..naming.flux import FLUX_MAP
    from ..naming.sd3 import SD3_MAP

    names = list(header.tensors)
    family = FLUX_FAMILY if any("double_blocks." in n for n in names) else SD3_FAMILY
    native_map = FLUX_MAP if family == FLUX_FAMILY else SD3_MAP
    slots: dict[str, Slot] = {}
    for name, info in header.tensors.items():
        shape, dtype = tuple(info.shape), info.dtype
        if match := _BUNDLED_TEXT.match(name):
            component = text_component(match.group(1), family)
            key = _text_key(component, match.group(2)) if component and len(shape) == 2 else None
            if key is not None:
                slots[key] = Slot(header.path, name, shape, dtype)
            continue
        bias = vectors and name.endswith(".bias") and len(shape) == 1
        if not bias and (not name.endswith(".weight") or len(shape) not in (2, 4)):
            continue
        path = name.removeprefix(UNET_PREFIX).rsplit(".", 1)[0]
        weight = header.tensors.get(name.rsplit(".", 1)[0] + ".weight") if bias else info
        if weight is None or len(weight.shape) < 2:
            continue
        target = native_map.to_target(path, (weight.shape[0], weight.shape[1]))
        if target is None:
            continue
        ranges = target.rows(weight.shape[0], weight.shape[1])
        for key, rows in zip(target.keys, ranges or ()):
            part = (rows[1] - rows[0], *shape[1:])
            slot_key = vector_key(key, "bias") if bias else key
            slots[slot_key] = Slot(header.path, name, part, dtype, rows if target.fused else None, target.swap)
    return slots


def checkpoint_slots(header: SafetensorsHeader, vectors: bool = False) -> dict[str, Slot]:
    """The adaptable layers of a single-file checkpoint in the original layout (and their vectors;
    OpenCLIP's are not addressed)."""
    names = list(header.tensors)
    if is_native_transformer(names):
        return native_slots(header, vectors)
    layout = infer_layout(names)
    slots: dict[str, Slot] = {}
    for name, info in header.tensors.items():
        shape, dtype = tuple(info.shape), info.dtype
        if vectors and (found := _vector(name, shape)):
            path, parameter = found
            key = None
            if name.startswith(UNET_PREFIX):
                mapped = sgm_to_diffusers(f"{path[len(UNET_PREFIX):]}.weight", layout)
                key = f"{UNET}.{mapped[: -len('.weight')]}" if mapped else None
            for prefix, component in CLIP_PREFIXES.items():
                if path.startswith(prefix):
                    key = _text_key(component, path[len(prefix):])
            if key is not None:
                slots[vector_key(key, parameter)] = Slot(header.path, name, shape, dtype)
            continue
        if name.startswith(UNET_PREFIX) and name.endswith(".weight") and len(shape) in (2, 4):
            path = sgm_to_diffusers(name[len(UNET_PREFIX):], layout)
            if path is not None:
                slots[f"{UNET}.{path[: -len('.weight')]}"] = Slot(header.path, name, shape, dtype)
            continue
        for prefix, component in CLIP_PREFIXES.items():
            if name.startswith(prefix) and name.endswith(".weight") and len(shape) == 2:
                key = _text_key(component, name[len(prefix): -len(".weight")])
                if key is not None:
                    slots[key] = Slot(header.path, name, shape, dtype)
        for prefix, component in OPEN_CLIP_PREFIXES.items():
            if name.startswith(prefix) and (match := _OPEN_CLIP_LAYER.match(name[len(prefix):])):
                base = f"{component}.text_model.encoder.layers.{match.group(1)}"
                if match.group(2) == "attn.in_proj_weight":
                    width = shape[0] // 3
                    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                        slots[f"{base}.self_attn.{proj}"] = Slot(header.path, name, (width, shape[1]), dtype,
                                                                 (i * width, (i + 1) * width))
                else:
                    slots[f"{base}.{_OPEN_CLIP_NAMES[match.group(2)]}"] = Slot(header.path, name, shape, dtype)
    return slots


def weight_files(folder: Path) -> list[Path]:
    """Every safetensors weight file of a diffusers component folder (all variants and shards)."""
    return sorted(p for p in folder.glob("*.safetensors") if p.name.split(".")[0].split("-")[0] in _WEIGHT_STEMS)


def preferred_files(files: list[Path]) -> list[Path]:
    """One consistent set of weight files: the plain (non-variant) ones if present, else one variant."""
    def variant(path: Path) -> str:
        stem = _SHARD.sub("", path.name[: -len(".safetensors")])
        return stem.split(".", 1)[1] if "." in stem else ""

    variants = sorted({variant(p) for p in files})
    chosen = "" if "" in variants else (variants[0] if variants else "")
    return [p for p in files if variant(p) == chosen]


@dataclass
class ModelWeights:
    """A base model (diffusers folder or single-file checkpoint) and where each adaptable layer lives."""

    path: Path
    kind: str  # "diffusers" or "checkpoint"
    slots: dict[str, Slot]
    _files: ExitStack = field(default_factory=ExitStack, repr=False)
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path, vectors: bool = False) -> ModelWeights:
        """Index the model at ``path`` from its file headers (``vectors``: biases and norm weights too)."""
        path = Path(path)
        if not path.exists():
            raise InputNotFoundError(f"{path} does not exist", "Check the path")
        if path.is_dir():
            return cls(path, "diffusers", _diffusers_folder_slots(path, vectors))
        if is_pickle(path):
            raise UnsafeFileError(f"{path.name} is a pickle checkpoint; reading it would run code stored in it",
                                  "Convert it to .safetensors first")
        header = read_header(path)
        header.require_complete()
        if not any(n.startswith(UNET_PREFIX) for n in header.tensors) and not is_native_transformer(list(header.tensors)):
            if any("lora" in n.lower() for n in header.tensors):
                raise NotALoraError(f"{path.name} is a LoRA adapter, not a base model",
                                    "Give a checkpoint or a diffusers folder as the base model")
            raise NotALoraError(f"{path.name} is not a model checkpoint: it has no '{UNET_PREFIX}' weights and no "
                                "Flux.1 or SD3 transformer blocks", "Give a single-file checkpoint or a diffusers folder")
        return cls(path, "checkpoint", checkpoint_slots(header, vectors))

    @property
    def family(self) -> str | None:
        """``flux`` or ``sd3`` when the model's own files say so (a transformer's config, original names)."""
        import json

        for _, folder in component_folders(self.path) if self.kind == "diffusers" else ():
            config = folder / "config.json"
            if config.is_file():
                name = str(json.loads(config.read_text()).get("_class_name", ""))
                if name.startswith("Flux"):
                    return FLUX_FAMILY
                if name.startswith("SD3"):
                    return SD3_FAMILY
        if self.kind == "checkpoint":
            names = {slot.name for slot in self.slots.values()}
            if any("double_blocks." in n for n in names):
                return FLUX_FAMILY
            if any("joint_blocks." in n for n in names):
                return SD3_FAMILY
        return None

    def shapes(self) -> dict[str, LayerShape]:
        """Every addressed layer's shape."""
        return {k: layer_shape(s.shape) for k, s in self.slots.items()}

    def read(self, key: str):
        """The stored weight of one layer (a torch tensor in its stored dtype, viewing the memory-mapped file)."""
        slot = self.slots[key]
        tensor = self._mapped(slot.file).tensor(slot.name)
        weight = tensor if slot.rows is None else tensor[slot.rows[0]: slot.rows[1]]
        if slot.swap:
            from ..formats.fusing import swap_halves

            weight = swap_halves(weight)
        return weight

    def release(self, key: str) -> None:
        """Let go of the memory of a layer read with :meth:`read` (its pages leave this process; the
        tensor stays valid): a pass over a model one layer at a time then holds one layer, not the model."""
        slot = self.slots[key]
        if slot.file in self._handles:
            self._handles[slot.file].release([slot.name])

    def _mapped(self, file: Path):
        from ..files.reader import MappedFile

        mapped = self._handles.get(file)
        if mapped is None:
            mapped = self._handles[file] = MappedFile(read_header(file))
        return mapped

    def close(self) -> None:
        """Release the open files."""
        self._files.close()
        self._handles.clear()

    def __enter__(self) -> ModelWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def component_folders(path: Path) -> Iterator[tuple[str, Path]]:
    """The adaptable components present in a diffusers folder (a transformer folder on its own is one)."""
    if is_transformer_folder(path):
        yield TRANSFORMER, path
        return
    for component in DIFFUSERS_COMPONENTS:
        folder = path / component
        if folder.is_dir():
            yield component, folder


def is_transformer_folder(path: Path) -> bool:
    """True for a diffusers transformer folder on its own (its config names a ``…Transformer2DModel``)."""
    import json

    config = path / "config.json"
    if not config.is_file() or not weight_files(path):
        return False
    try:
        return str(json.loads(config.read_text()).get("_class_name", "")).endswith("Transformer2DModel")
    except (OSError, ValueError, AttributeError):
        return False


def _diffusers_folder_slots(path: Path, vectors: bool = False) -> dict[str, Slot]:
    folders = list(component_folders(path))
    if not folders:
        raise InputNotFoundError(f"{path} is not a diffusers model folder: it has no unet/, transformer/ or "
                                 "text_encoder/ folder",
                                 "Give the folder that holds model_index.json, or a single-file checkpoint")
    slots: dict[str, Slot] = {}
    for component, folder in folders:
        files = preferred_files(weight_files(folder))
        if not files:
            if any(folder.glob("*.bin")):
                raise UnsafeFileError(f"{folder} holds only pickle (.bin) weights",
                                      "Re-save the model with safetensors (save_pretrained(..., safe_serialization=True))")
            raise InputNotFoundError(f"{folder} has no safetensors weights")
        for file in files:
            header = read_header(file)
            header.require_complete()
            slots.update(diffusers_slots(component, header, vectors))
    return slots


