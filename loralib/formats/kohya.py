"""kohya-ss / sd-scripts LoRA files — the format every consumer reads (A1111, ComfyUI, Forge, diffusers).

Keys: ``<module>.lora_down.weight``, ``<module>.lora_up.weight``, optional ``<module>.alpha``
(scalar; missing means alpha = rank) and ``<module>.lora_mid.weight`` (CP-decomposed LoCon).
Module names are flattened paths (see :mod:`loralib.naming.kohya`); SDXL UNets use SGM block
names, which is what sd-scripts writes and what is written here. Textual-inversion tokens
travel as A1111's bundled embeddings, ``bundle_emb.<name>.string_to_param.*``. LyCORIS and DoRA
modules are written with LyCORIS' suffixes (:func:`loralib.formats.lycoris.module_tensors`); a
file with any of them is read back by the LyCORIS format.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..architectures import ARCHITECTURES, SD1, SDXL, TEXT_ENCODER_2
from ..errors import CorruptFileError
from ..naming.kohya import module_name, parse_module_name
from ..naming.sgm import UNetLayout
from .base import AdapterIndex, Format, Inputs, Kind, ModuleEntry, SaveResult, WriteRequest
from .source import TensorSource
from .writing import write_single_file

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter

KOHYA = Kind("kohya", "kohya-ss LoRA", True)
KOHYA_KEY = re.compile(r"^(lora_(?:unet|te|te1|te2)_\w+)\.(lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha)$")
BUNDLE_KEY = re.compile(r"^bundle_emb\.([^.]+)\.(.+)$")  # A1111's textual-inversion tokens bundled with a LoRA

_PLAIN_EMBEDDING = ("string_to_param.*", "emb_params")
_SGM_CROSS = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_.*_attn2_to_[kv]$")


def _sgm_layout(source: TensorSource, modules: dict[str, dict[str, str]]) -> UNetLayout:
    """SGM numbering differs between SD1/SD2 and SDXL; decide which one a file uses."""
    widths = {source.shapes[parts["lora_down.weight"]][1] for name, parts in modules.items()
              if _SGM_CROSS.match(name) and "lora_down.weight" in parts and len(source.shapes[parts["lora_down.weight"]]) > 1}
    if widths & {768, 1024} and 2048 not in widths:
        return UNetLayout.from_config(SD1.unet_config)
    return UNetLayout.from_config(SDXL.unet_config)


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
    layout = _sgm_layout(source, modules)
    alphas = source.scalars([parts["alpha"] for parts in modules.values() if "alpha" in parts])
    entries: dict[str, ModuleEntry] = {}
    for name, parts in modules.items():
        key = parse_module_name(name, layout)
        if key is None:
            unrecognised.extend(parts.values())
            continue
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            missing = "lora_up" if "lora_down.weight" in parts else "lora_down"
            raise CorruptFileError(f"{source.path.name}: module {name} has no {missing} weight", "The file is incomplete")
        if key in entries:
            raise CorruptFileError(f"{source.path.name} adapts {key} twice (under two different names)")
        alpha = alphas[parts["alpha"]] if "alpha" in parts else None
        entry = ModuleEntry(key, source, parts["lora_down.weight"], parts["lora_up.weight"], alpha,
                            parts.get("lora_mid.weight"))
        entry.check_shapes()
        entries[key] = entry
    if unrecognised:
        raise CorruptFileError(
            f"{source.path.name} has {len(unrecognised)} key(s) that name no module of an SD1.x, SD2.x or SDXL "
            f"model, e.g. {', '.join(sorted(unrecognised)[:3])}",
            "The file was probably written by a broken converter; lorareg will not guess what they mean")
    metadata = {k: v for k, v in source.metadata.items()}
    return AdapterIndex(KOHYA, [source], entries, metadata, embeddings)


def write(adapter: LoraAdapter, path: Path, request: WriteRequest) -> SaveResult:
    """Write ``adapter`` as one kohya file."""
    return write_single_file(adapter, path, request, KOHYA.format, state_dict(adapter, dtype=request.dtype))


def state_dict(adapter: LoraAdapter, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The kohya tensors of an adapter (SGM names and ``lora_te1``/``lora_te2`` for SDXL)."""
    import torch

    arch = ARCHITECTURES.get(adapter.architecture)
    two_encoders = adapter.architecture == SDXL.name or TEXT_ENCODER_2 in adapter.components
    layout = UNetLayout.from_config(arch.unet_config) if arch is not None and arch.uses_sgm_names else None
    tensors: dict[str, torch.Tensor] = {}
    for key, module in adapter.modules.items():
        if dtype is not None:
            module = module.to(dtype)
        name = module_name(key, sgm_layout=layout, two_text_encoders=two_encoders)
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
        # float32 as sd-scripts writes it, unless that would round this alpha
        exact = float(torch.tensor(module.alpha, dtype=torch.float32)) == module.alpha
        tensors[f"{name}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32 if exact else torch.float64)
    for token, vectors in adapter.embeddings.items():
        name, _, part = token.replace(".", "_").partition("/")
        tensors[f"bundle_emb.{name}.{part or 'string_to_param.*'}"] = vectors.reshape(-1, vectors.shape[-1])
    return tensors


FORMAT = Format("kohya", "kohya-ss LoRA (sd-scripts, A1111, ComfyUI, Forge)", ((KOHYA, KOHYA_KEY), (KOHYA, BUNDLE_KEY)),
                read, write,
                holds_embeddings=True, holds_cp_mid=True,
                holds_kinds=frozenset({"lora", "loha", "lokr", "full", "norm", "dora", "bias"}))
