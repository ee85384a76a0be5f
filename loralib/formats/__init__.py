"""Reading any supported adapter file into a :class:`~loralib.adapter.LoraAdapter`, and writing one.

Read: kohya, PEFT folders, diffusers (current, 0.21-era, attention processors), cloneofsimo.
Write: ``kohya`` (default; what every consumer reads), ``peft``, ``diffusers``.
Everything else that looks like a model file is named precisely in the error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import (CorruptFileError, InputNotFoundError, InvalidArgumentError, NotALoraError,
                      UnsafeFileError, UnsupportedFormatError)
from ..files import is_pickle
from . import cloneofsimo, diffusers, kohya, peft
from .base import AdapterIndex, SaveResult
from .detect import CLONEOFSIMO, KOHYA, PEFT, Kind, identify, looks_like_broken_lora
from .source import TensorSource

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter

WRITE_FORMATS = ("kohya", "peft", "diffusers")


@dataclass
class Inputs:
    """The files behind one adapter path, and the PEFT configs that go with them."""

    path: Path
    sources: list[TensorSource]
    peft_configs: dict[Path, dict] = field(default_factory=dict)


def _open_file(path: Path, allow_pickle: bool) -> TensorSource:
    if is_pickle(path):
        if not allow_pickle:
            raise UnsafeFileError(
                f"{path.name} is a pickle file ({path.suffix}); reading it would run code stored in it",
                "If you trust its source, pass --allow-pickle (Python: allow_pickle=True), or ask for a .safetensors copy")
        return _open_pickle(path)
    return TensorSource.from_safetensors(path)


def _open_pickle(path: Path) -> TensorSource:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptFileError(f"{path.name} could not be read as a PyTorch file: {type(exc).__name__}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise NotALoraError(f"{path.name} holds a {type(data).__name__}, not a dictionary of tensors")
    return TensorSource.from_state_dict(path, data)


def open_inputs(path: str | Path, *, allow_pickle: bool = False) -> Inputs:
    """Find and open the file(s) of the adapter at ``path`` (a file or a folder); headers only."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path} does not exist", "Check the path")
    folder = path if path.is_dir() else path.parent
    is_peft = (folder / peft.CONFIG_NAME).is_file() or (path.is_dir() and any(
        (folder / sub / peft.CONFIG_NAME).is_file() for sub in peft.SUBFOLDERS))
    if is_peft and (path.is_dir() or path.name in (peft.WEIGHTS_NAME, peft.PICKLE_WEIGHTS_NAME)):
        files = peft.component_files(folder)
        if not files:
            raise InputNotFoundError(f"{folder} has an {peft.CONFIG_NAME} but no {peft.WEIGHTS_NAME}")
        sources = [_open_file(f, allow_pickle) for f in files]
        return Inputs(path, sources, {s.path: peft.read_config(s.path.parent) for s in sources})
    if path.is_dir():
        candidate = path / diffusers.WEIGHTS_NAME
        if candidate.is_file():
            return Inputs(path, [_open_file(candidate, allow_pickle)])
        found = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f"It holds {', '.join(found[:3])}: name one of them" if found else "Name the adapter file itself"
        raise InputNotFoundError(f"{path} is a folder without a LoRA adapter in a known layout", hint)
    return Inputs(path, [_open_file(path, allow_pickle)])


def identify_inputs(inputs: Inputs) -> Kind:
    """What the inputs hold; raises a precise error when it is nothing lorareg recognises."""
    if inputs.peft_configs:
        return PEFT
    source = inputs.sources[0]
    kind = identify(source.names, source.shapes, source.metadata)
    if kind is not None:
        return kind
    name = inputs.path.name
    if not source.names:
        raise NotALoraError(f"{name} holds no tensors")
    broken = looks_like_broken_lora(source.names)
    if broken:
        raise CorruptFileError(
            f"{name} has LoRA-like keys in no known spelling, e.g. {', '.join(sorted(broken)[:2])}",
            "The file was probably written by a broken converter; lorareg will not guess what they mean")
    raise NotALoraError(f"{name} is not a LoRA adapter: none of its {len(source.names)} tensors "
                        f"({', '.join(sorted(source.names)[:2])}, …) are LoRA weights")


def refuse(kind: Kind, name: str) -> None:
    """Raise the error for a recognised file that is not a plain LoRA."""
    if not kind.is_adapter:
        raise NotALoraError(f"{name} is not a LoRA adapter: it is a {kind.title}")
    if kind.family is not None:
        raise UnsupportedFormatError(f"{name} is a {kind.title}",
                                     "lorareg converts and merges SD1.x, SD2.x and SDXL adapters only")
    raise UnsupportedFormatError(f"{name} is a {kind.title}, not a plain LoRA",
                                 "This operation needs plain low-rank factors (down/up); inspect still works")


def index_inputs(inputs: Inputs, kind: Kind) -> AdapterIndex:
    """Index plain-LoRA inputs of a known kind (headers only)."""
    if not kind.plain_lora:
        refuse(kind, inputs.path.name)
    if kind == PEFT:
        parts = [peft.parse(s, inputs.peft_configs[s.path]) for s in inputs.sources]
        index = parts[0]
        for part in parts[1:]:
            index.sources += part.sources
            index.modules.update(part.modules)
        return index
    source = inputs.sources[0]
    if kind == KOHYA:
        return kohya.parse(source)
    if kind == CLONEOFSIMO:
        return cloneofsimo.parse(source)
    return diffusers.parse(source)


def index_adapter(path: str | Path, *, allow_pickle: bool = False) -> AdapterIndex:
    """Index the plain LoRA adapter at ``path`` from its headers, without loading tensors."""
    inputs = open_inputs(path, allow_pickle=allow_pickle)
    return index_inputs(inputs, identify_inputs(inputs))


def load_adapter(path: str | Path, *, allow_pickle: bool = False) -> LoraAdapter:
    """Load the LoRA adapter at ``path`` (a file or a PEFT/diffusers folder), in any readable format."""
    from ..adapter import LoraAdapter, LoraModule

    from ..files.hashes import Deferred, tensor_data_sha256

    index = index_adapter(path, allow_pickle=allow_pickle)
    main = index.sources[0]
    # The tensor hash (the adapter's identity in operation records) is computed while tensors load.
    identity = Deferred(tensor_data_sha256, main.path, main.header.data_start) if main.header else None
    tensors = {}
    for source in index.sources:
        wanted = [n for e in index.modules.values() if e.source is source for n in (e.down, e.up, e.mid) if n]
        wanted += [n for s, n in index.embeddings.values() if s is source]
        tensors[id(source)] = source.load(wanted)
    modules = {}
    for key, e in index.modules.items():
        loaded = tensors[id(e.source)]
        modules[key] = LoraModule(loaded[e.down], loaded[e.up], e.effective_alpha,
                                  loaded[e.mid] if e.mid else None)
    embeddings = {token: tensors[id(s)][n] for token, (s, n) in index.embeddings.items()}
    return LoraAdapter(modules, index.architecture.name, index.kind.format, dict(index.metadata),
                       embeddings, Path(path), _source_tensor_sha256=identity)


def _normalise_format(format: str) -> str:
    name = format.lower().strip()
    if name not in WRITE_FORMATS:
        raise InvalidArgumentError(f"unknown output format {format!r}", f"Choose one of {', '.join(WRITE_FORMATS)}")
    return name


def save_adapter(adapter: LoraAdapter, path: str | Path, format: str = "kohya", *, force: bool = False,
                 dtype: torch.dtype | None = None, drop_embeddings: bool = False,
                 operation: dict | None = None, title: str | None = None) -> SaveResult:
    """Write ``adapter`` to ``path`` in ``format`` atomically; see :meth:`LoraAdapter.save`."""
    from .. import metadata as meta
    from ..files.atomic import atomic_dir, check_output
    from ..files.writer import write_safetensors

    format = _normalise_format(format)
    path = Path(path)
    if not adapter.modules:
        raise InvalidArgumentError("the adapter has no modules; there is nothing to write")
    notes = []
    if adapter.embeddings and format != "kohya":
        if not drop_embeddings:
            raise UnsupportedFormatError(
                f"the adapter carries textual-inversion tokens ({', '.join(adapter.embeddings)}) that the "
                f"{format} format cannot hold",
                "Write kohya format (A1111 reads them as bundled embeddings), or pass --drop-embeddings to leave them out")
        notes.append(f"left out textual-inversion tokens: {', '.join(adapter.embeddings)}")
    if any(m.mid is not None for m in adapter.modules.values()) and format != "kohya":
        notes.append("folded CP-decomposed conv factors (lora_mid) into lora_down; ΔW is unchanged")
    if format == "peft":
        target = path
        if target.exists() and not target.is_dir():
            raise InvalidArgumentError(f"{target} is a file; PEFT output is a folder", "Give a folder path with -o")
        existing = [f for f in peft.component_files(target)] if target.is_dir() else []
        if existing and not force:
            check_output(existing[0], force=False)
        stem = title or target.name
        metadata = meta.build(adapter, title=stem, operation=operation)
        files, main_hash = [], None
        with atomic_dir(target) as tmp:
            for component in adapter.components:
                tensors, config = peft.component_state(adapter, component, dtype)
                folder = tmp / peft.relative_folder(component)
                folder.mkdir(exist_ok=True)
                tensor_sha256 = write_safetensors(folder / peft.WEIGHTS_NAME, tensors, {"format": "pt", **metadata},
                                                  meta.SELF_HASHES)
                (folder / peft.CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                files += [target / peft.relative_folder(component) / n for n in (peft.WEIGHTS_NAME, peft.CONFIG_NAME)]
                main_hash = main_hash or tensor_sha256
        _complete(operation)
        return SaveResult(files[0], format, files, main_hash, notes)
    if format == "diffusers" and (path.is_dir() or str(path).endswith(("/", "\\"))):
        path.mkdir(exist_ok=True)
        path = path / diffusers.WEIGHTS_NAME
    check_output(path, force=force)
    metadata = meta.build(adapter, title=title or path.stem, operation=operation)
    if format == "kohya":
        tensors = kohya.state_dict(adapter, dtype=dtype)
    else:
        tensors, extra = diffusers.state_dict(adapter, dtype=dtype)
        metadata = {"format": "pt", **metadata, **extra}
    tensor_sha256 = write_safetensors(path, tensors, metadata, meta.SELF_HASHES)
    _complete(operation)
    return SaveResult(path, format, [path], tensor_sha256, notes)


def _complete(operation: dict | None) -> None:
    """Fill in the input hashes an operation record named before they were computed (see
    :meth:`LoraAdapter.source_tensor_sha256_for_metadata`), so callers get final values."""
    if operation is not None:
        from ..files.hashes import fill_placeholders

        fill_placeholders(operation)


def convert(source: str | Path, output: str | Path, format: str = "kohya", *, force: bool = False,
            dtype: torch.dtype | None = None, drop_embeddings: bool = False, allow_pickle: bool = False) -> SaveResult:
    """Convert the adapter at ``source`` to ``format`` at ``output``; ``ΔW`` of every module is unchanged."""
    from ..metadata import input_record

    format = _normalise_format(format)
    adapter = load_adapter(source, allow_pickle=allow_pickle)
    operation = {"operation": "convert", "from_format": adapter.source_format, "to_format": format,
                 "inputs": [input_record(adapter)]}
    return adapter.save(output, format, force=force, dtype=dtype, drop_embeddings=drop_embeddings, operation=operation)
