"""Which files make up an adapter, and opening them: a file, or a folder in a known layout.

The layouts themselves are data in each format module (:class:`~loralib.formats.base.FolderLayout`:
PEFT's ``adapter_model.safetensors`` + ``adapter_config.json`` with component subfolders,
diffusers' ``pytorch_lora_weights.safetensors``); this module is the one place that interprets
them, for loading, the catalog and the Hub alike. Only headers are read here.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from ..errors import CorruptFileError, InputNotFoundError, NotALoraError, UnsafeFileError
from ..files import file_kind, is_pickle, require_regular_file
from .base import Inputs
from .source import TensorSource
from .table import folder_formats


def open_inputs(path: str | Path, *, allow_pickle: bool = False) -> Inputs:
    """Find and open the file(s) of the adapter at ``path`` (a file or a folder); headers only."""
    path = path if isinstance(path, Path) else Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path} does not exist", "Check the path")
    is_dir = path.is_dir()
    folder = path if is_dir else path.parent
    for fmt in folder_formats():
        layout = fmt.folder
        if layout.config is None or fmt.read_config is None:
            continue
        config = folder / layout.config
        config_kind = file_kind(config)  # one stat: this runs for every file a scan reads
        if config_kind not in (None, "missing"):  # a FIFO or device: refused, never taken as "no config"
            require_regular_file(config, "JSON file")
        if (layout.holds(folder) if is_dir else config_kind is None and path.name in layout.weights):
            files = layout.component_files(folder)
            if not files:
                raise InputNotFoundError(f"{folder} has an {layout.config} but no {layout.weights[0]}")
            sources = [open_file(f, allow_pickle) for f in files]
            return Inputs(path, sources, {s.path: fmt.read_config(s.path.parent) for s in sources}, fmt)
    if is_dir:
        for fmt in folder_formats():
            files = fmt.folder.component_files(path) if fmt.folder.config is None else []
            if files:
                return Inputs(path, [open_file(files[0], allow_pickle)])
        found = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f"It holds {', '.join(found[:3])}: name one of them" if found else "Name the adapter file itself"
        raise InputNotFoundError(f"{path} is a folder without a LoRA adapter in a known layout", hint)
    return Inputs(path, [open_file(path, allow_pickle)])


def open_file(path: Path, allow_pickle: bool) -> TensorSource:
    """The header of one tensor file; a pickle file only with consent (it is then loaded whole).

    A FIFO, socket or device is refused before it is opened (reading one would block or never end).
    """
    require_regular_file(path, "tensor file")
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
        raise CorruptFileError(f"{path.name} could not be read as a PyTorch file: {type(exc).__name__}") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise NotALoraError(f"{path.name} holds a {type(data).__name__}, not a dictionary of tensors")
    return TensorSource.from_state_dict(path, data)


def adapter_root(path: Path) -> Path:
    """What a loader must be given for the adapter stored in file ``path``.

    That is the file itself, except for the weights of a folder layout with a config (PEFT):
    their folder, or the folder above when the file is a component subfolder's.
    """
    for fmt in folder_formats():
        layout = fmt.folder
        if layout.config and path.name in layout.weights and (path.parent / layout.config).is_file():
            folder = path.parent
            return folder.parent if folder.name in layout.subfolders else folder
    return path


def main_file(root: Path) -> Path:
    """The file whose hashes identify the adapter at ``root`` (a file, or an adapter folder)."""
    if root.is_dir():
        for fmt in folder_formats():
            files = fmt.folder.component_files(root) if fmt.folder.holds(root) else []
            if files:
                return files[0]
    return root


def adapter_files(root: Path) -> list[Path]:
    """Every file that makes up the adapter at ``root``: the file, or a folder's weights and configs."""
    if not root.is_dir():
        return [root]
    for fmt in folder_formats():
        if fmt.folder.holds(root):
            files = fmt.folder.files(root)
            if files:
                return files
    return []


def companions(filename: str, names: list[str]) -> list[str]:
    """Among a repository's file ``names``, those an adapter stored at ``filename`` needs beside it
    (a PEFT folder's config and component subfolders), as repository paths."""
    path = PurePosixPath(filename)
    present = set(names)
    for fmt in folder_formats():
        layout = fmt.folder
        if layout.config is None or path.name not in layout.weights:
            continue
        folder = path.parent
        wanted = [folder / layout.config]
        for sub in layout.subfolders:
            wanted += [folder / sub / layout.weights[0], folder / sub / layout.config]
        return [str(p) for p in wanted if str(p) in present and str(p) != filename]
    return []
