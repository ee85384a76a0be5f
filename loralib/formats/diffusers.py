"""diffusers LoRA files, current and legacy.

Current (written): ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (``transformer.<path>`` for
Flux.1 and SD3, as diffusers, PEFT, ai-toolkit and SimpleTuner write them), ``text_encoder.…``,
``text_encoder_2.…``, ``text_encoder_3.…``, with the per-component PEFT ``LoraConfig`` in the
``lora_adapter_metadata`` entry of the safetensors metadata (flattened as ``unet.r``,
``unet.lora_alpha``, …); without it the scale is 1 (alpha = rank), and a ``<path>.alpha`` key
gives a module's alpha (kohya convention).

Legacy (read only, scale 1): the 0.21-era ``<path>.lora.down.weight`` with text encoders as
``<path>.lora_linear_layer.down.weight``, and the attention-processor format
``<attention>.processor.to_q_lora.down.weight`` (with or without ``unet.``).

Full-rank differences some trainers add (read only): ``unet.<path>.diff`` (a weight, or a norm
layer's 1-D weight) and ``unet.<path>.diff_b`` (a bias, alone or beside the layer's LoRA factors);
likewise under ``transformer.`` and the text encoders.

Every path must be a diffusers module path (its first segment one of the model's own); files
that spell other names with these suffixes — OneTrainer's ORIGINAL spelling puts SGM paths
there, ``input_blocks.4.1.proj_in.lora_A.weight`` — belong to another reader.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from ..architectures import UNET
from ..errors import CorruptFileError
from ..naming import internal_key
from .base import AdapterIndex, FolderLayout, Format, Inputs, Kind, ModuleEntry, SaveResult, WriteRequest
from .lycoris import full_entry
from .peft import component_of
from .peft_config import PeftScales, build_config, config_path
from .source import TensorSource
from .writing import write_single_file

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter

DIFFUSERS = Kind("diffusers", "diffusers LoRA", True)
DIFFUSERS_OLD = Kind("diffusers-old", "diffusers 0.21-era LoRA (lora.down/lora.up)", True)
ATTN_PROCS = Kind("diffusers-attnprocs", "diffusers attention-processor LoRA (to_q_lora)", True)
# First segments of diffusers module paths, per component kind.
UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
              "add_embedding")
TRANSFORMER_ROOTS = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                     "time_text_embed", "norm_out", "proj_out", "pos_embed")
TEXT_ROOTS = ("text_model", "encoder.layers", "encoder.block", "embeddings", "final_layer_norm", "text_projection",
              "shared")
_ROOTS = "|".join(re.escape(r) for r in (*UNET_ROOTS, *TRANSFORMER_ROOTS, *TEXT_ROOTS))
_COMPONENT = r"(?:(unet|transformer|text_encoder|text_encoder_2|text_encoder_3)\.)?"
_PATH = rf"((?:{_ROOTS})(?:\.\w+)*?)"
DIFFUSERS_KEY = re.compile(rf"^{_COMPONENT}{_PATH}\.lora_([AB])(?:\.default(?:_\d+)?)?\.weight$")
DIFFUSERS_OLD_KEY = re.compile(rf"^{_COMPONENT}{_PATH}\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
ATTN_PROC_KEY = re.compile(rf"^{_COMPONENT}{_PATH}\.(?:processor\.)?"
                           r"(to_q|to_k|to_v|to_out|add_k_proj|add_v_proj)_lora\.(down|up)\.weight$")
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LAYOUT = FolderLayout((WEIGHTS_NAME,))
METADATA_KEY = "lora_adapter_metadata"
_ALPHA_KEY = re.compile(rf"^{_COMPONENT}{_PATH}\.alpha$")
DIFF_KEY = re.compile(rf"^(unet|transformer|text_encoder|text_encoder_2|text_encoder_3)\.{_PATH}\.(diff|diff_b)$")
_KIND_ROOTS = {"unet": UNET_ROOTS, "transformer": TRANSFORMER_ROOTS}
# Attention-processor LoRA names the projection; text encoders call them q_proj…out_proj.
_UNET_PROJECTION = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0",
                    "add_k_proj": "add_k_proj", "add_v_proj": "add_v_proj"}
_TE_PROJECTION = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _component_configs(metadata: dict[str, str], path_name: str) -> dict[str, dict]:
    from ..jsontext import JSONTextError, loads

    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = loads(raw)
    except JSONTextError as exc:
        raise CorruptFileError(f"{path_name} has a {METADATA_KEY} entry that cannot be read: {exc}") from exc
    if not isinstance(flat, dict):
        raise CorruptFileError(f"{path_name} has a {METADATA_KEY} entry that is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def fits(component: str | None, path: str) -> bool:
    """True when ``path`` is a module path of that component's model (any, without a component)."""
    roots = _KIND_ROOTS.get(component or "", TEXT_ROOTS if component else None)
    return roots is None or path.startswith(roots)


def _classify(name: str) -> tuple[str, str | None, str, str] | None:
    """(spelling, component prefix, module path, factor 'down'/'up') of any diffusers spelling whose
    module path belongs to its component's model."""
    if match := DIFFUSERS_KEY.match(name):
        component, path, ab = match.groups()
        parsed = DIFFUSERS.format, component, path, "down" if ab == "A" else "up"
    elif match := ATTN_PROC_KEY.match(name):
        component, parent, projection, factor = match.groups()
        parent = parent.removesuffix(".processor")
        is_text = component not in (None, UNET) or ".self_attn" in f".{parent}"
        table = _TE_PROJECTION if is_text else _UNET_PROJECTION
        parsed = ATTN_PROCS.format, component, f"{parent}.{table[projection]}", factor
    elif match := DIFFUSERS_OLD_KEY.match(name):
        parsed = (DIFFUSERS_OLD.format, *match.groups())
    else:
        return None
    return parsed if fits(parsed[1], parsed[2]) else None


def read(inputs: Inputs) -> AdapterIndex:
    """Index a diffusers LoRA file in any of its spellings."""
    return parse(inputs.sources[0])


def parse(source: TensorSource) -> AdapterIndex:
    """Index a diffusers LoRA file in any of its spellings."""
    factors: dict[tuple[str | None, str], dict[str, str]] = {}
    alphas: dict[tuple[str | None, str], str] = {}
    spelling = Counter()
    unrecognised = []
    differences: dict[tuple[str, str], dict[str, str]] = {}
    for name in source.names:
        if name.endswith(".alpha") and (match := _ALPHA_KEY.match(name)):
            alphas[match.group(1), match.group(2)] = name
            continue
        if (match := DIFF_KEY.match(name)) and fits(match.group(1), match.group(2)):
            differences.setdefault((match.group(1), match.group(2)), {})[match.group(3)] = name
            continue
        parsed = _classify(name)
        if parsed is None:
            unrecognised.append(name)
            continue
        spelled, component, path, factor = parsed
        factors.setdefault((component, path), {})[factor] = name
        spelling[spelled] += 1
    if unrecognised:
        raise CorruptFileError(
            f"{source.path.name} has {len(unrecognised)} key(s) that are not diffusers LoRA weights, "
            f"e.g. {', '.join(sorted(unrecognised)[:3])}")
    scales = {component: PeftScales(config, f"{source.path.name} ({METADATA_KEY}, {component})")
              for component, config in _component_configs(source.metadata, source.path.name).items()}
    alpha_values = source.scalars(list(alphas.values()))
    entries: dict[str, ModuleEntry] = {}
    for (component, path), parts in factors.items():
        if set(parts) != {"down", "up"}:
            raise CorruptFileError(f"{source.path.name}: module {path} lacks its {'up' if 'down' in parts else 'down'} factor")
        entry = ModuleEntry(path, source, parts["down"], parts["up"])
        entry.check_shapes()
        component = component or component_of(path, "", entry.in_features)
        key = entry.key = internal_key(component, path)
        if key in entries:
            raise CorruptFileError(f"{source.path.name} adapts {key} twice")
        bias = differences.get((component, path), {})
        if "diff" in bias:
            raise CorruptFileError(f"{source.path.name}: module {path} has both LoRA factors and a full weight difference")
        entry.bias = bias.pop("diff_b", None)
        if (component, path) in alphas or (None, path) in alphas:
            entry.alpha = alpha_values[alphas.get((component, path)) or alphas[None, path]]
        elif component in scales:
            entry.alpha = scales[component].alpha(key.split(".", 1)[1], entry.rank)
        entry.check_alpha()
        entries[key] = entry
    for (component, path), parts in differences.items():
        if parts:  # differences of layers without LoRA factors
            key = internal_key(component, path)
            entries[key] = full_entry(key, path, parts, source)
    kinds = {kind.format: kind for kind in (DIFFUSERS, ATTN_PROCS, DIFFUSERS_OLD)}
    kind = kinds[spelling.most_common(1)[0][0]] if spelling else DIFFUSERS
    if differences and any(e.kind != "lora" or e.bias for e in entries.values()):
        kind = Kind(kind.format, f"{kind.title} with full-rank differences (diff/diff_b)", False)
    metadata = {k: v for k, v in source.metadata.items() if k != METADATA_KEY}
    return AdapterIndex(kind, [source], entries, metadata)


def write(adapter: LoraAdapter, path: Path, request: WriteRequest) -> SaveResult:
    """Write ``adapter`` in the current diffusers spelling (into ``path`` as a folder when it is one)."""
    if path.is_dir() or str(path).endswith(("/", "\\")):
        path.mkdir(exist_ok=True)
        path = path / WEIGHTS_NAME
    tensors, extra = state_dict(adapter, dtype=request.dtype)
    return write_single_file(adapter, path, request, DIFFUSERS.format, tensors, before={"format": "pt"}, after=extra)


def state_dict(adapter: LoraAdapter, *, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The current-diffusers tensors of an adapter and its ``lora_adapter_metadata`` entry."""
    tensors: dict[str, torch.Tensor] = {}
    per_component: dict[str, dict[str, tuple[int, float]]] = {}
    for key, module in adapter.modules.items():
        module = module.without_mid()
        if dtype is not None:
            module = module.to(dtype)
        tensors[f"{key}.lora_A.weight"] = module.down
        tensors[f"{key}.lora_B.weight"] = module.up
        per_component.setdefault(key.split(".", 1)[0], {})[config_path(key)] = (module.rank, module.alpha)
    flat = {}
    for component, ranks_alphas in per_component.items():
        config = build_config(ranks_alphas)
        config.pop("peft_type")
        flat.update({f"{component}.{field}": value for field, value in config.items()})
    return tensors, {METADATA_KEY: json.dumps(flat, sort_keys=True)}


# A PEFT key also reads as a current diffusers key: the PEFT format comes first in the table.
FORMAT = Format("diffusers", "diffusers LoRA (load_lora_weights)",
                ((ATTN_PROCS, ATTN_PROC_KEY), (DIFFUSERS_OLD, DIFFUSERS_OLD_KEY), (DIFFUSERS, DIFFUSERS_KEY),
                 (DIFFUSERS, _ALPHA_KEY), (DIFFUSERS, DIFF_KEY)),
                read, write, folder=LAYOUT)
