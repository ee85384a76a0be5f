"""kohya-ss / sd-scripts LoRA files — the format every consumer reads (A1111, ComfyUI, Forge, diffusers).

Keys: ``<module>.lora_down.weight``, ``<module>.lora_up.weight``, optional ``<module>.alpha``
(scalar; missing means alpha = rank) and ``<module>.lora_mid.weight`` (CP-decomposed LoCon).
Module names are flattened paths resolved by :mod:`loralib.naming.kohya` for the file's family:
SD UNets in diffusers or SGM names (SDXL is written with SGM names, as sd-scripts does), Flux.1
and SD3 transformers in their original BFL/MMDiT names — fused ``qkv``/``linear1`` layers are
split on reading and fused on writing (:mod:`loralib.formats.fusing`) — or in diffusers names
under ``lora_transformer_`` (OneTrainer's spelling, read only). OneTrainer's LEGACY spelling
(diffusers names under ``lora_unet_`` for SDXL too) is read as well. Textual-inversion tokens
travel as A1111's bundled embeddings, ``bundle_emb.<name>.string_to_param.*``. LyCORIS and DoRA
modules of SD1.x/SD2.x/SDXL adapters are written with LyCORIS' suffixes
(:func:`loralib.formats.lycoris.module_tensors`); a file with any of them is read back by the
LyCORIS format.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..architectures import (
    ARCHITECTURES,
    FLUX_FAMILY,
    SD,
    SD1,
    SD3_FAMILY,
    SDXL,
    TEXT_ENCODER_2,
    TRANSFORMER,
    claimed_architecture,
    family_of,
)
from ..errors import CorruptFileError, UnsupportedFormatError
from ..naming.kohya import family_of_names, module_name, resolve_module_name
from ..naming.sgm import UNetLayout
from .base import AdapterIndex, Format, Inputs, Kind, ModuleEntry, SaveResult, WriteRequest
from .source import TensorSource
from .writing import write_single_file

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter

KOHYA = Kind("kohya", "kohya-ss LoRA", True)
KOHYA_KEY = re.compile(r"^(lora_(?:unet|te|te1|te2|te3|transformer)_\w+)\.(lora_down\.weight|lora_up\.weight|"
                       r"lora_mid\.weight|alpha)$")
BUNDLE_KEY = re.compile(r"^bundle_emb\.([^.]+)\.(.+)$")  # A1111's textual-inversion tokens bundled with a LoRA

_PLAIN_EMBEDDING = ("string_to_param.*", "emb_params")
_SGM_CROSS = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_.*_attn2_to_[kv]$")
FAMILY_TITLES = {SD: "SD1.x, SD2.x or SDXL", FLUX_FAMILY: "Flux.1", SD3_FAMILY: "SD3/SD3.5"}


def _sgm_layout(source: TensorSource, modules: dict[str, dict[str, str]]) -> UNetLayout:
    """SGM numbering differs between SD1/SD2 and SDXL; decide which one a file uses."""
    widths = {source.shapes[parts["lora_down.weight"]][1] for name, parts in modules.items()
              if _SGM_CROSS.match(name) and "lora_down.weight" in parts and len(source.shapes[parts["lora_down.weight"]]) > 1}
    if widths & {768, 1024} and 2048 not in widths:
        return UNetLayout.from_config(SD1.unet_config)
    return UNetLayout.from_config(SDXL.unet_config)


def file_family(source: TensorSource, modules: dict[str, dict[str, str]]) -> tuple[str, bool]:
    """Which family's names a kohya-style file uses (``sd``, ``flux``, ``sd3``) and whether its names say so.

    BFL and MMDiT block names say it outright, and so do the text encoders (a T5 under
    ``lora_te2_`` is Flux's, a CLIP under ``lora_te2_`` next to a T5 SD3's). Diffusers names under
    ``lora_transformer_`` are the same in both families; their widths or else the metadata decide
    (only the numbering of text encoders depends on it).
    """
    names = list(modules)
    family = family_of_names(names)
    if family is not None:
        return family, True
    t5 = [n for n in names if n.startswith(("lora_te2_encoder_block_", "lora_te3_encoder_block_"))]
    transformer = [n for n in names if n.startswith("lora_transformer_")]
    if not t5 and not transformer:
        return SD, True
    if any(n.startswith("lora_te2_encoder_block_") for n in t5):
        return FLUX_FAMILY, True
    if (t5 and any(n.startswith("lora_te2_text_model_") for n in names)) or "_attn2_" in " ".join(transformer):
        return SD3_FAMILY, True
    widths = {source.shapes[parts["lora_down.weight"]][1] for name, parts in modules.items()
              if name.startswith("lora_transformer_transformer_blocks_") and "lora_down.weight" in parts
              and re.search(r"_(to_[qkv]|add_[qkv]_proj)$", name)}
    if widths & {1536, 2432}:
        return SD3_FAMILY, True
    if 3072 in widths:
        return FLUX_FAMILY, True
    claim = family_of(claimed_architecture(source.metadata) or "")
    return (claim if claim in (FLUX_FAMILY, SD3_FAMILY) else FLUX_FAMILY), False


def read(inputs: Inputs) -> AdapterIndex:
    """Index a kohya file from its header."""
    return parse(inputs.sources[0])


def parse(source: TensorSource) -> AdapterIndex:
    """Index a kohya file from its header."""
    modules: dict[str, dict[str, str]] = defaultdict(dict)
    embeddings: dict[str, tuple[TensorSource, str]] = {}
    unrecognised: list[str] = []
    for name in source.names:
        if match := KOHYA_KEY.match(name):
            modules[match.group(1)][match.group(2)] = name
        elif match := BUNDLE_KEY.match(name):
            token, part = match.groups()
            embeddings[token if part in _PLAIN_EMBEDDING else f"{token}/{part}"] = (source, name)
        else:
            unrecognised.append(name)
    family, certain = file_family(source, modules)
    layout = _sgm_layout(source, modules) if family == SD else None
    alphas = source.scalars([parts["alpha"] for parts in modules.values() if "alpha" in parts])
    entries: dict[str, ModuleEntry] = {}
    for name, parts in modules.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            missing = "lora_up" if "lora_down.weight" in parts else "lora_down"
            raise CorruptFileError(f"{source.path.name}: module {name} has no {missing} weight", "The file is incomplete")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        target = resolve_module_name(name, layout, family=family, shape=stored_shape(source, down, up))
        if target is None:
            unrecognised.extend(parts.values())
            continue
        alpha = alphas[parts["alpha"]] if "alpha" in parts else None
        add_entries(entries, source, fused_entries(target, source, down, up, alpha, parts.get("lora_mid.weight"), name))
    refuse_unplaced(source, unrecognised, family)
    metadata = {k: v for k, v in source.metadata.items()}
    hint = family if certain and family != SD else None
    return AdapterIndex(KOHYA, [source], entries, metadata, embeddings, family=hint)


def stored_shape(source: TensorSource, down: str, up: str) -> tuple[int, int] | None:
    """``(out, in)`` of a stored module's layer from its factor shapes, None if they are malformed."""
    down_shape, up_shape = source.shapes[down], source.shapes[up]
    return (up_shape[0], down_shape[1]) if len(down_shape) >= 2 and len(up_shape) >= 1 else None


def add_entries(entries: dict[str, ModuleEntry], source: TensorSource, new: dict[str, ModuleEntry]) -> None:
    """Add the entries one stored module became, refusing a module the file adapts twice."""
    for key, entry in new.items():
        if key in entries:
            raise CorruptFileError(f"{source.path.name} adapts {key} twice (under two different names)")
        entries[key] = entry


def refuse_unplaced(source: TensorSource, unrecognised: list[str], family: str) -> None:
    """Raise when keys name no module of the family's model: never guess what they mean."""
    if unrecognised:
        raise CorruptFileError(
            f"{source.path.name} has {len(unrecognised)} key(s) that name no module of an {FAMILY_TITLES[family]} "
            f"model, e.g. {', '.join(sorted(unrecognised)[:3])}",
            "The file was probably written by a broken converter; lorareg will not guess what they mean")


def fused_entries(target, source: TensorSource, down: str, up: str, alpha: float | None, mid: str | None,
                  name: str) -> dict[str, ModuleEntry]:
    """The module entries a stored module stands for: one, or one per part of a fused layer."""
    up_shape, down_shape = source.shapes[up], source.shapes[down]
    if not target.fused:
        entry = ModuleEntry(target.keys[0], source, down, up, alpha, mid, swap=target.swap)
        entry.check_shapes()
        return {entry.key: entry}
    ranges = target.rows(up_shape[0], down_shape[-1]) if len(up_shape) == 2 and len(down_shape) == 2 else None
    if ranges is None:
        raise CorruptFileError(
            f"{source.path.name}: the fused layer {name} has factors of shapes {list(down_shape)} and {list(up_shape)}, "
            f"but it holds {len(target.keys)} layers of {' + '.join(f'{u}×' for u in target.units)}its input width",
            "The file is damaged or was written for another model")
    entries = {}
    for key, rows in zip(target.keys, ranges):
        entry = ModuleEntry(key, source, down, up, alpha, mid, rows=rows)
        entry.check_shapes()
        entries[key] = entry
    return entries


def write(adapter: LoraAdapter, path: Path, request: WriteRequest) -> SaveResult:
    """Write ``adapter`` as one kohya file."""
    tensors = state_dict(adapter, dtype=request.dtype, fused_rank=request.fused_rank)
    return write_single_file(adapter, path, request, KOHYA.format, tensors)


def adapter_family(adapter: LoraAdapter) -> str:
    """The family whose names a writer must use for ``adapter`` (a precise error when it cannot tell)."""
    family = family_of(adapter.architecture)
    if family is not None:
        return family
    if TRANSFORMER in adapter.components or any(c.startswith("text_encoder_3") for c in adapter.components):
        raise UnsupportedFormatError(
            "the adapter's transformer modules fit neither Flux.1 nor SD3 by their widths, so their original "
            "names (which differ between the two) are unknown",
            "Write the diffusers format (--to diffusers), whose names do not depend on the family")
    return SD


def state_dict(adapter: LoraAdapter, *, dtype: torch.dtype | None = None,
               fused_rank: int | None = None) -> dict[str, torch.Tensor]:
    """The kohya tensors of an adapter (SGM names and ``lora_te1``/``lora_te2`` for SDXL; BFL/MMDiT names
    with fused layers for Flux.1 and SD3)."""

    from .fusing import native_modules

    family = adapter_family(adapter)
    arch = ARCHITECTURES.get(adapter.architecture)
    two_encoders = adapter.architecture == SDXL.name or TEXT_ENCODER_2 in adapter.components
    layout = UNetLayout.from_config(arch.unet_config) if arch is not None and arch.uses_sgm_names else None
    named: dict[str, object] = {}
    transformer = {k: m for k, m in adapter.modules.items() if k.startswith(TRANSFORMER + ".")}
    if family != SD and transformer:
        named.update({f"lora_unet_{native.replace('.', '_')}": module
                      for native, module in native_modules(transformer, family, rank=fused_rank).items()})
    for key, module in adapter.modules.items():
        if key in transformer and family != SD:
            continue
        named[module_name(key, sgm_layout=layout, two_text_encoders=two_encoders, family=family)] = module
    tensors: dict[str, torch.Tensor] = {}
    for name, module in named.items():
        if dtype is not None:
            module = module.to(dtype)
        if module.kind != "lora":
            from .lycoris import module_tensors

            tensors.update(module_tensors(name, module))
            continue
        tensors[f"{name}.lora_down.weight"] = module.down
        tensors[f"{name}.lora_up.weight"] = module.up
        if module.mid is not None:
            tensors[f"{name}.lora_mid.weight"] = module.mid
        if module.bias is not None:  # a bias difference beside the factors, as LyCORIS and ComfyUI spell it
            tensors[f"{name}.diff_b"] = module.bias
        tensors[f"{name}.alpha"] = alpha_tensor(module.alpha)
    for token, vectors in adapter.embeddings.items():
        name, _, part = token.replace(".", "_").partition("/")
        tensors[f"bundle_emb.{name}.{part or 'string_to_param.*'}"] = vectors.reshape(-1, vectors.shape[-1])
    return tensors


def alpha_tensor(alpha: float):
    """A scalar alpha tensor: float32 as sd-scripts writes it, unless that would round this alpha."""
    import torch

    exact = float(torch.tensor(alpha, dtype=torch.float32)) == alpha
    return torch.tensor(alpha, dtype=torch.float32 if exact else torch.float64)


FORMAT = Format("kohya", "kohya-ss LoRA (sd-scripts, A1111, ComfyUI, Forge)", ((KOHYA, KOHYA_KEY), (KOHYA, BUNDLE_KEY)),
                read, write,
                holds_embeddings=True, holds_cp_mid=True,
                holds_kinds=frozenset({"lora", "loha", "lokr", "full", "norm", "dora", "bias"}))
