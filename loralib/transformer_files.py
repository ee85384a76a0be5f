"""Single-file Flux.1 and SD3/SD3.5 transformers: tell the family, write one, load one offline.

The files users hold name the transformer's weights as the original code does — Black Forest
Labs' names for Flux.1 (``double_blocks.0.img_attn.qkv.weight``, as in ``flux1-dev.safetensors``)
and Stability's MMDiT names for SD3/SD3.5 (``joint_blocks.0.x_block.attn.qkv.weight``) — bare or
behind ComfyUI's ``model.diffusion_model.`` prefix in all-in-one checkpoints. The family is told
from key names and the configuration from tensor shapes (never from metadata); diffusers' own
single-file loader (``from_single_file``) then converts the weights, given the configuration as a
local folder so nothing is downloaded.

Writing (:func:`native_state_dict`) is the inverse of diffusers' converters, built on the module
tables of :mod:`loralib.naming.flux` and :mod:`loralib.naming.sd3`; ``lorareg tiny-model
--single-file`` uses it, and the tests load its output with diffusers' converters.

All-in-one files also hold the VAE and text encoders (:data:`PART_PREFIXES`);
:func:`load_file_part` reads each of them, configured from a diffusers folder.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .architectures import FLUX, FLUX_FAMILY, SD3, SD3_FAMILY, SD35_LARGE, SD35_MEDIUM
from .errors import InvalidArgumentError

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
# Per-block norms have no Linear, so the module tables do not hold them: diffusers suffix -> native.
_FLUX_NORMS = {
    "transformer_blocks": {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                           "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                           "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                           "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"},
    "single_transformer_blocks": {"attn.norm_q.weight": "norm.query_norm.scale",
                                  "attn.norm_k.weight": "norm.key_norm.scale"},
}
_SD3_NORMS = {"transformer_blocks": {"attn.norm_q.weight": "x_block.attn.ln_q.weight",
                                     "attn.norm_k.weight": "x_block.attn.ln_k.weight",
                                     "attn.norm_added_q.weight": "context_block.attn.ln_q.weight",
                                     "attn.norm_added_k.weight": "context_block.attn.ln_k.weight",
                                     "attn2.norm_q.weight": "x_block.attn2.ln_q.weight",
                                     "attn2.norm_k.weight": "x_block.attn2.ln_k.weight"}}
_NATIVE_BLOCKS = {"transformer_blocks": {FLUX_FAMILY: "double_blocks", SD3_FAMILY: "joint_blocks"},
                  "single_transformer_blocks": {FLUX_FAMILY: "single_blocks"}}


@dataclass(frozen=True)
class TransformerFile:
    """What a single file's header shows: its family, architecture, key prefix and diffusers config."""

    family: str
    architecture: str
    prefix: str
    config: dict[str, Any]
    has_other_parts: bool
    parts: tuple[str, ...] = ()  # the other parts it holds that lorareg reads (PART_PREFIXES' names)

    def components(self) -> dict[str, str]:
        """The pipeline components the file holds besides the transformer: component name -> part name."""
        return {COMPONENTS_OF_PARTS[self.family][part]: part for part in self.parts}


# What all-in-one files (ComfyUI's checkpoint save, Stability's "incl_clips" files) hold besides the
# transformer, under which prefixes: the VAE in the original (LDM) names, the text encoders in
# transformers' own names.
PART_PREFIXES = {"vae": ("vae.", "first_stage_model."), "clip_l": ("text_encoders.clip_l.transformer.",),
                 "clip_g": ("text_encoders.clip_g.transformer.",), "t5xxl": ("text_encoders.t5xxl.transformer.",)}
_PART_STARTS = tuple(start for starts in PART_PREFIXES.values() for start in starts)
COMPONENTS_OF_PARTS = {FLUX_FAMILY: {"vae": "vae", "clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
                       SD3_FAMILY: {"vae": "vae", "clip_l": "text_encoder", "clip_g": "text_encoder_2",
                                    "t5xxl": "text_encoder_3"}}


def _native_map(family: str):
    from .naming.flux import FLUX_MAP
    from .naming.sd3 import SD3_MAP

    return FLUX_MAP if family == FLUX_FAMILY else SD3_MAP


def native_state_dict(transformer, family: str) -> dict[str, Any]:
    """The weights of a diffusers Flux.1 or SD3 transformer under the original names (BFL / MMDiT),
    as the files ``FluxTransformer2DModel.from_single_file`` and ``SD3Transformer2DModel.from_single_file`` read."""
    import torch

    from .formats.fusing import swap_halves

    native = _native_map(family)
    norms = _FLUX_NORMS if family == FLUX_FAMILY else _SD3_NORMS
    grouped: dict[str, list[tuple[int, Any]]] = {}
    swaps: dict[str, bool] = {}
    out: dict[str, Any] = {}
    for name, tensor in transformer.state_dict().items():
        tensor = tensor.detach()
        if name == "pos_embed.pos_embed":
            out["pos_embed"] = tensor
            continue
        if match := re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", name):
            blocks, index, rest = match.groups()
            if rest in norms.get(blocks, {}):
                out[f"{_NATIVE_BLOCKS[blocks][family]}.{index}.{norms[blocks][rest]}"] = tensor
                continue
        module, _, suffix = name.rpartition(".")
        found = native.to_native(module)
        if found is None:
            raise ValueError(f"no original name for {name}")
        path, part, rule = found
        key = f"{path}.{suffix}"
        grouped.setdefault(key, []).append((part, tensor))
        swaps[key] = rule.swap or (rule.swap_when_narrow and suffix == "weight" and tensor.shape[0] == 2 * tensor.shape[1])
    for key, parts in grouped.items():
        tensor = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], dim=0)
        if key.endswith(".bias"):
            swaps[key] = swaps.get(key[:-5] + ".weight", False)
        out[key] = tensor
    for key, tensor in out.items():
        if swaps.get(key):
            out[key] = swap_halves(tensor)
    return {k: v.contiguous() for k, v in out.items()}


def write_transformer_file(transformer, family: str, path: str | Path, *, prefix: str = "") -> Path:
    """Write ``transformer`` as one ``.safetensors`` file in original names (behind ``prefix``), atomically."""
    from safetensors.torch import save_file

    from .files.atomic import atomic_file

    path = Path(path)
    tensors = {prefix + k: v for k, v in native_state_dict(transformer, family).items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp))
    return path


def _strip(names: Mapping[str, tuple[int, ...]]) -> tuple[str, dict[str, tuple[int, ...]]]:
    for prefix in PREFIXES:
        inner = {k[len(prefix):]: v for k, v in names.items() if k.startswith(prefix) and not k.startswith(_PART_STARTS)}
        if any(k.startswith(("double_blocks.", "joint_blocks.")) for k in inner):
            return prefix, inner
    return "", {}


def _count(shapes: Mapping[str, tuple[int, ...]], root: str) -> int:
    indices = {int(m.group(1)) for k in shapes if (m := re.match(rf"^{root}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _template(width: int, full: Mapping, full_width: int, tiny: str, what: str, path: Path) -> dict:
    """The full-size config for a full-width file, the tiny one (``lorareg tiny-model``) for a tiny one."""
    from .tiny_models import tiny_transformer_config

    if width == full_width:
        return dict(full)
    tiny_config = tiny_transformer_config(tiny)
    if width == tiny_config["num_attention_heads"] * tiny_config["attention_head_dim"]:
        return tiny_config
    raise InvalidArgumentError(f"{path.name} is a {what} transformer {width} wide, a width no {what} model has "
                               f"(full size: {full_width})", "Give a Flux.1 / SD3 / SD3.5 file as published")


def inspect_transformer_file(path: str | Path, shapes: Mapping[str, tuple[int, ...]]) -> TransformerFile | None:
    """The family and diffusers config of a single file with tensor ``shapes`` (name -> shape); None
    when its names are neither Flux.1's nor SD3's. Raises a one-line error for a damaged one."""
    path = Path(path)
    prefix, inner = _strip(shapes)
    if not inner:
        return None
    others = any(not k.startswith(prefix) for k in shapes) if prefix else False
    held = tuple(part for part, starts in PART_PREFIXES.items() if any(k.startswith(starts) for k in shapes))
    try:
        if "double_blocks.0.img_attn.qkv.weight" in inner:
            parts = tuple(p for p in held if p in COMPONENTS_OF_PARTS[FLUX_FAMILY])
            return TransformerFile(FLUX_FAMILY, FLUX.name, prefix, _flux_config(path, inner), others, parts)
        if "joint_blocks.0.x_block.attn.qkv.weight" in inner:
            config = _sd3_config(path, inner)
            if config.get("dual_attention_layers"):
                architecture = SD35_MEDIUM.name
            else:
                architecture = SD35_LARGE.name if config.get("qk_norm") else SD3.name
            return TransformerFile(SD3_FAMILY, architecture, prefix, config, others, held)
    except KeyError as exc:
        raise InvalidArgumentError(f"{path.name} looks like a Flux.1/SD3 transformer but has no {exc.args[0]}",
                                   "The file is incomplete; download it again") from exc
    return None


def _flux_config(path: Path, s: Mapping[str, tuple[int, ...]]) -> dict:
    width = s["img_in.weight"][0]
    config = _template(width, FLUX.denoiser_config, 3072, "flux", "Flux.1", path)
    head = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    config.update(in_channels=s["img_in.weight"][1], out_channels=None, num_layers=_count(s, "double_blocks"),
                  num_single_layers=_count(s, "single_blocks"), attention_head_dim=head,
                  num_attention_heads=width // head, joint_attention_dim=s["txt_in.weight"][1],
                  pooled_projection_dim=s["vector_in.in_layer.weight"][1],
                  guidance_embeds="guidance_in.in_layer.weight" in s)
    config["out_channels"] = s["final_layer.linear.weight"][0] // config.get("patch_size", 1) ** 2
    if sum(config["axes_dims_rope"]) != head:
        raise InvalidArgumentError(f"{path.name} has Flux.1 attention heads {head} wide, which lorareg has no "
                                   "position-embedding layout for", "Give a Flux.1 dev or schnell file")
    return config


def _sd3_config(path: Path, s: Mapping[str, tuple[int, ...]]) -> dict:
    width, channels, patch, _ = s["x_embedder.proj.weight"]
    full = {1536: SD3.denoiser_config, 2432: SD35_LARGE.denoiser_config}.get(width, SD3.denoiser_config)
    config = _template(width, full, width if width in (1536, 2432) else 1536, "sd3", "SD3", path)
    layers = _count(s, "joint_blocks")
    dual = tuple(i for i in range(layers) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in s)
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in s
    if qk_norm and s["joint_blocks.0.x_block.attn.ln_q.weight"][0] != config["attention_head_dim"]:
        raise InvalidArgumentError(f"{path.name} has SD3 attention heads of an unknown width", "Give an SD3/SD3.5 file")
    positions = s["pos_embed"][1]
    config.update(patch_size=patch, in_channels=channels, out_channels=s["final_layer.linear.weight"][0] // patch ** 2,
                  num_layers=layers, num_attention_heads=width // config["attention_head_dim"],
                  caption_projection_dim=s["context_embedder.weight"][0], joint_attention_dim=s["context_embedder.weight"][1],
                  pooled_projection_dim=s["y_embedder.mlp.0.weight"][1], pos_embed_max_size=round(positions ** 0.5),
                  dual_attention_layers=dual, qk_norm="rms_norm" if qk_norm else None)
    return config


def diffusers_state_dict(native: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The inverse of :func:`native_state_dict`: original names (no prefix) to diffusers' names."""
    from .formats.fusing import swap_halves

    table = _native_map(family)
    norms = _FLUX_NORMS if family == FLUX_FAMILY else _SD3_NORMS
    inverse = {(_NATIVE_BLOCKS[blocks][family], n): d for blocks, rows in norms.items() for d, n in rows.items()}
    blocks_of = {_NATIVE_BLOCKS[b][family]: b for b in norms}
    out: dict[str, Any] = {}
    for key, tensor in native.items():
        if key == "pos_embed":
            out["pos_embed.pos_embed"] = tensor
            continue
        if (match := re.match(r"^(\w+)\.(\d+)\.(.+)$", key)) and (match[1], match[3]) in inverse:
            out[f"{blocks_of[match[1]]}.{match[2]}.{inverse[(match[1], match[3])]}"] = tensor
            continue
        module, _, suffix = key.rpartition(".")
        weight = native.get(f"{module}.weight")
        target = table.to_target(module, tuple(weight.shape[:2]) if weight is not None else None)
        if target is None or weight is None:
            raise InvalidArgumentError(f"the transformer file has a weight {key} that no {family} model has",
                                       "Give a Flux.1 or SD3/SD3.5 transformer as published")
        if target.swap:
            tensor = swap_halves(tensor)
        width = weight.shape[1] if len(target.keys) > 1 else tensor.shape[0]
        for part, rows in zip(target.keys, tensor.split([u * width for u in target.units], dim=0)):
            out[f"{part.split('.', 1)[1]}.{suffix}"] = rows.contiguous()
    return out


def load_transformer_file(path: str | Path, info: TransformerFile, dtype=None):
    """Load the transformer of a single file with diffusers' own converter, offline (the config is
    written to a temporary folder that ``from_single_file`` reads as its ``config``).

    diffusers' Flux.1 converter assumes the full width (3072); a narrower Flux.1 file (the tiny
    model's) is converted with :func:`diffusers_state_dict` instead.
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if info.family == FLUX_FAMILY else SD3Transformer2DModel
    config = {"_class_name": cls.__name__, **info.config}
    kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
    if info.family == FLUX_FAMILY and config["num_attention_heads"] * config["attention_head_dim"] != 3072:
        return _load_narrow(path, info, cls, config, dtype)
    with tempfile.TemporaryDirectory(prefix="lorareg-config-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        return cls.from_single_file(str(path), config=folder, local_files_only=True, **kwargs)


def _load_narrow(path: str | Path, info: TransformerFile, cls, config: dict, dtype):
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    native = {k[len(info.prefix):]: v for k, v in tensors.items()
              if k.startswith(info.prefix) and not k.startswith(_PART_STARTS)}
    model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    missing, unexpected = model.load_state_dict(diffusers_state_dict(native, info.family), strict=False)
    if missing or unexpected:
        raise InvalidArgumentError(f"{Path(path).name} is not a complete Flux.1 transformer "
                                   f"({len(missing)} weights missing, {len(unexpected)} unknown)",
                                   "The file is incomplete or damaged; download it again")
    import torch

    model.eval()  # as from_pretrained and from_single_file leave it
    return model.to(dtype) if dtype not in (None, torch.float32) else model


def load_file_part(path: str | Path, part: str, cls, config_folder: Path, dtype=None):
    """The pipeline component ``cls`` of an all-in-one file's ``part`` (see :data:`PART_PREFIXES`),
    configured from ``config_folder`` (the diffusers folder's subfolder for that component).

    The VAE goes through diffusers' own converter of the original names; a text encoder's weights
    are transformers' own, loaded as they are. Weights the configuration expects but the file
    lacks are a one-line error, never random values.
    """
    import torch

    plain = dtype in (None, torch.float32)  # naming float32 only draws deprecation warnings
    if part == "vae":
        kwargs: dict[str, Any] = {} if plain else {"torch_dtype": dtype}
        try:
            return cls.from_single_file(str(path), config=str(config_folder.parent), subfolder=config_folder.name,
                                        local_files_only=True, **kwargs)
        except (RuntimeError, NotImplementedError, ValueError, KeyError) as exc:  # missing or misshapen weights
            raise _damaged_part(path, part, str(exc).splitlines()[0][:120]) from exc
    from safetensors import safe_open

    (prefix,) = PART_PREFIXES[part]
    with safe_open(str(path), framework="pt") as opened:
        names = opened.keys()  # safe_open is not iterable
        state = {name[len(prefix):]: opened.get_tensor(name) for name in names if name.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a buffer older files store
    config = cls.config_class.from_pretrained(config_folder)
    kwargs = {} if plain else {"dtype": dtype}
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True, **kwargs)
    except (RuntimeError, ValueError) as exc:  # weights of another shape than the configuration's
        raise _damaged_part(path, part, "weights of another shape than its configuration says") from exc
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    if missing:
        raise _damaged_part(path, part, f"{len(missing)} weights missing, e.g. {missing[0]}")
    return model.eval()


def _damaged_part(path: str | Path, part: str, why: str) -> InvalidArgumentError:
    what = "VAE" if part == "vae" else f"{part} text encoder"
    return InvalidArgumentError(f"{Path(path).name} holds an incomplete or damaged {what} ({why})",
                                "The file is damaged, or the components folder is of another model")
