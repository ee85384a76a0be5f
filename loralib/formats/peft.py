"""PEFT ``save_pretrained`` folders: ``adapter_model.safetensors`` + ``adapter_config.json``.

A PEFT adapter belongs to one model, so a pipeline adapter is a folder per component: the
denoiser's adapter (UNet, or the Flux/SD3 transformer) at the top (what
``PeftModel.from_pretrained(unet, folder)`` expects) and the text encoders in ``text_encoder/``,
``text_encoder_2/`` and ``text_encoder_3/`` subfolders. Keys are
``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight``; the config's ``r``,
``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` and ``use_rslora`` give each module's scale. A
lone ``base_model.model.…`` file without its config (as some Flux trainers publish) is read
with scale 1, as diffusers reads it. A DoRA adapter (``use_dora``) adds
``<module path>.lora_magnitude_vector``: one magnitude per output feature
(:class:`~loralib.lycoris.kinds.DoraModule`); a component is written as DoRA when all of its
modules are LoRA-based DoRA with per-output magnitudes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..architectures import ARCHITECTURES, DENOISERS, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, TRANSFORMER, UNET
from ..errors import CorruptFileError, InvalidArgumentError, UnsupportedFormatError
from ..files.atomic import atomic_dir, check_output, refuse_input_as_output
from ..files.hashes import adapter_hashes
from ..naming import TE_ROOT, internal_key
from ..naming.clip import text_model_prefix
from .base import AdapterIndex, FolderLayout, Format, Inputs, Kind, ModuleEntry, SaveResult, WriteRequest
from .peft_config import PeftScales, build_config, config_path
from .source import TensorSource
from .writing import file_metadata, write_tensor_file

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter

PEFT = Kind("peft", "PEFT LoRA", True)
PEFT_DORA = Kind("peft", "PEFT DoRA (weight-decomposed LoRA)", False)
PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
MAGNITUDE_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$")
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
SUBFOLDERS = (TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, UNET, TRANSFORMER)
LAYOUT = FolderLayout((WEIGHTS_NAME, PICKLE_WEIGHTS_NAME), CONFIG_NAME, SUBFOLDERS)
_TE_ROOTS = (TE_ROOT + ".", "encoder.layers.", "embeddings.", "final_layer_norm", "text_projection")
_T5_ROOTS = ("encoder.block.", "shared")
_TRANSFORMER_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder",
                      "time_text_embed.", "norm_out.", "proj_out", "pos_embed.")


def read_config(folder: Path) -> dict:
    """Read and check a folder's ``adapter_config.json``."""
    from ..files import require_regular_file
    from ..jsontext import JSONTextError, loads

    path = folder / CONFIG_NAME
    if not path.exists():
        raise CorruptFileError(f"{folder} has {WEIGHTS_NAME} but no {CONFIG_NAME}",
                               "PEFT needs both files; without the config the scale of each module is unknown")
    require_regular_file(path, "JSON file")
    try:
        config = loads(path.read_bytes())
    except JSONTextError as exc:
        raise CorruptFileError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(config, dict):
        raise CorruptFileError(f"{path} does not hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        shown = peft_type.upper() if isinstance(peft_type, str) else repr(peft_type)[:40]
        raise UnsupportedFormatError(f"{folder} is a PEFT {shown[:40]} adapter, not a LoRA",
                                     "Only plain LoRA adapters can be converted")
    return config


def component_of(path: str, folder_name: str, in_features: int) -> str:
    """Which pipeline component a PEFT module path belongs to."""
    if folder_name in SUBFOLDERS:
        return folder_name
    if path.startswith(_TE_ROOTS):
        return TEXT_ENCODER_2 if in_features == 1280 else TEXT_ENCODER
    if path.startswith(_T5_ROOTS):
        return TEXT_ENCODER_2
    if path.startswith(_TRANSFORMER_ROOTS):
        return TRANSFORMER
    return UNET


def read(inputs: Inputs) -> AdapterIndex:
    """Index a PEFT folder: the adapter of each component, with its config (a lone file: scale 1)."""
    parts = [parse(source, inputs.configs.get(source.path)) for source in inputs.sources]
    index = parts[0]
    for part in parts[1:]:
        index.sources += part.sources
        index.modules.update(part.modules)
    return index


def parse(source: TensorSource, config: dict | None) -> AdapterIndex:
    """Index one PEFT ``adapter_model.safetensors`` with its config (None: no config, scale 1)."""
    pairs: dict[str, dict[str, str]] = {}
    unrecognised = []
    for name in source.names:
        match = PEFT_KEY.match(name) or MAGNITUDE_KEY.match(name)
        if match is None:
            unrecognised.append(name)
            continue
        pairs.setdefault(match.group(1), {})[match.group(2) if match.re is PEFT_KEY else "M"] = name
    if unrecognised:
        raise CorruptFileError(f"{source.path} has keys PEFT LoRA does not use, e.g. {', '.join(unrecognised[:3])}")
    folder_name = source.path.parent.name
    scales = PeftScales(config, str(source.path.parent / CONFIG_NAME)) if config is not None else None
    entries: dict[str, ModuleEntry] = {}
    for path, ab in pairs.items():
        if not {"A", "B"} <= set(ab):
            raise CorruptFileError(f"{source.path}: module {path} lacks lora_{'B' if 'A' in ab else 'A'}")
        if config is not None and config.get("use_dora") and "M" not in ab:
            raise CorruptFileError(f"{source.path}: the config says use_dora but module {path} has no "
                                   "lora_magnitude_vector", "The adapter folder is incomplete")
        entry = ModuleEntry(path, source, ab["A"], ab["B"], magnitude=ab.get("M"), magnitude_style="peft")
        entry.check_shapes()
        entry.key = internal_key(component_of(path, folder_name, entry.in_features), path)
        if scales is not None:
            entry.alpha = scales.alpha(entry.key.split(".", 1)[1], entry.rank)
        entries[entry.key] = entry
    kind = PEFT_DORA if any(e.magnitude for e in entries.values()) else PEFT
    return AdapterIndex(kind, [source], entries, dict(source.metadata))


def component_state(adapter: LoraAdapter, component: str, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict]:
    """The PEFT tensors and config of one component of an adapter.

    Text-encoder paths are spelled as the installed transformers builds the model (with or
    without ``text_model.``), because PEFT loads by exact module path.
    """
    arch = ARCHITECTURES.get(adapter.architecture)
    cls_name = arch.text_encoder_class(component) if arch is not None and component in arch.text_encoders else None
    tensors, ranks_alphas = {}, {}
    modules = {key: module for key, module in adapter.modules.items() if key.split(".", 1)[0] == component}
    use_dora = _uses_dora(component, modules)
    for key, module in modules.items():
        if dtype is not None:
            module = module.to(dtype)
        magnitude = None
        if use_dora:
            from ..lycoris.kinds import stored_magnitude

            magnitude, module = stored_magnitude(module, "peft"), module.inner
        module = module.without_mid()
        path = key.split(".", 1)[1]
        if component not in DENOISERS and path.startswith(TE_ROOT + "."):
            path = text_model_prefix(component, cls_name) + path.removeprefix(TE_ROOT + ".")
        tensors[f"base_model.model.{path}.lora_A.weight"] = module.down
        tensors[f"base_model.model.{path}.lora_B.weight"] = module.up
        if magnitude is not None:
            tensors[f"base_model.model.{path}.lora_magnitude_vector"] = magnitude.contiguous()
        ranks_alphas[config_path(key)] = (module.rank, module.alpha)
    config = build_config(ranks_alphas)
    config["use_dora"] = use_dora
    return tensors, config


def _uses_dora(component: str, modules: dict) -> bool:
    """Whether a component is written as a DoRA adapter; PEFT's ``use_dora`` is all or nothing per config."""
    dora = [m for m in modules.values() if m.kind == "dora"]
    if not dora:
        return False
    fits = [m for m in dora if m.inner.kind == "lora" and m.axis == "out"]
    if len(dora) != len(modules) or len(fits) != len(dora):
        raise UnsupportedFormatError(
            f"PEFT cannot hold the {component} modules: use_dora is all or nothing per component, and PEFT DoRA "
            "decomposes plain LoRA factors with one magnitude per output feature",
            "Write kohya format (it holds every DoRA variant), or make a plain LoRA with convert --plain --base MODEL")
    return True


def relative_folder(component: str) -> str:
    """Where a component's adapter goes inside a PEFT folder ("" for the denoiser: UNet or transformer)."""
    return "" if component in DENOISERS else component


def write(adapter: LoraAdapter, folder: Path, request: WriteRequest) -> SaveResult:
    """Write ``adapter`` as a PEFT folder: the denoiser at the top, text encoders in subfolders."""
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError(f"{folder} is a file; PEFT output is a folder", "Give a folder path with -o")
    refuse_input_as_output(folder, request.inputs)
    for component in adapter.components:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            refuse_input_as_output(folder / relative_folder(component) / name, request.inputs)
    existing = LAYOUT.component_files(folder) if folder.is_dir() else []
    if existing and not request.force:
        check_output(existing[0], force=False)
    header = file_metadata(adapter, request, folder.name)
    files, written = [], {}
    with atomic_dir(folder) as tmp:
        for component in adapter.components:
            tensors, config = component_state(adapter, component, request.dtype)
            inside = tmp / relative_folder(component)
            inside.mkdir(exist_ok=True)
            weights = folder / relative_folder(component) / WEIGHTS_NAME
            written[weights] = write_tensor_file(inside / WEIGHTS_NAME, tensors, header, request, before={"format": "pt"}).moved(weights)
            (inside / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            files += [weights, weights.with_name(CONFIG_NAME)]
    # the main file first, as readers list them (the top level, then the subfolders)
    ordered = [path for path in LAYOUT.component_files(folder) if path in written] or list(written)
    main = written[ordered[0]]
    return SaveResult(files[0], PEFT.format, files, main.tensor_sha256, list(request.notes), header.completed_operation(),
                      _hashes=lambda: adapter_hashes([(path, written[path].hashes()) for path in ordered]))


FORMAT = Format("peft", "PEFT save_pretrained folder", ((PEFT, PEFT_KEY), (PEFT, MAGNITUDE_KEY)), read, write,
                folder=LAYOUT, read_config=read_config, writes_folder=True, holds_kinds=frozenset({"lora", "dora"}))
