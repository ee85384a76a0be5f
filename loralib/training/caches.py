"""Latents and caption embeddings computed once, kept in memory or in files (``cache_to_disk``).

A latent entry holds an image's VAE distribution (mean and standard deviation), its loss mask at
latent resolution (with ``masked_loss``) and its crop (SDXL's size conditioning). A text entry
holds a caption's hidden states and, for SDXL, its pooled embedding.

On disk every entry is one safetensors file named by a SHA-256 key over everything its contents
depend on: for latents the image's path, byte size and modification time, the mask file's, the
training size and a fingerprint of the VAE's weights; for captions the caption and a fingerprint
of the tokenizers and text encoders. A changed image, caption, resolution, bucket or model gets
a new key, so a stale entry is never read (old files stay until the folder is deleted). Files
are written under a temporary name and renamed, so an interrupted run leaves no partial entry;
an entry that cannot be read is computed again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CACHE_VERSION = "1"  # bump when the contents of an entry change meaning


@dataclass
class LatentEntry:
    """One image's cached encoding."""

    mean: torch.Tensor
    std: torch.Tensor
    mask: torch.Tensor | None
    original_size: tuple[int, int]   # (height, width) of the source image
    crop_corner: tuple[int, int]     # (top, left)


def fingerprint(*modules: Any, extra: Any = None) -> str:
    """A SHA-256 over the modules' parameter names, shapes, dtypes and a strided sample of their values.

    Models that differ anywhere in practice (another checkpoint, a fine-tune) differ in the sample;
    computing it reads a few thousand numbers per tensor instead of every weight.
    """
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for module in modules:
        digest.update(type(module).__name__.encode())
        for name, parameter in module.state_dict().items():
            flat = parameter.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
            digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def file_identity(path: Path) -> str:
    """What identifies a file's version cheaply: its resolved path, size and modification time."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], default=str).encode()).hexdigest()


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from ..files.atomic import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)


def _complete(path: Path, names: tuple[str, ...]) -> bool:
    """True when ``path`` is a whole safetensors file holding ``names`` (only its header is read)."""
    from ..errors import LoraError
    from ..files.header import read_header

    if not path.is_file():
        return False
    try:
        header = read_header(path)
    except LoraError:
        return False
    return not header.is_truncated and set(names) <= set(header.tensors)


def _read(path: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception:  # missing, truncated or not safetensors: compute the entry again
        return None


class LatentStore:
    """Latent entries by (image, training size): a dictionary, or files under ``folder``."""

    def __init__(self, folder: Path | None = None, model_fingerprint: str = "", masked: bool = False) -> None:
        self.folder = folder
        self.model_fingerprint = model_fingerprint
        self.masked = masked
        self.memory: dict[tuple[Path, tuple[int, int]], LatentEntry] = {}
        self.files: dict[tuple[Path, tuple[int, int]], Path] = {}

    def file(self, image: Path, bucket: tuple[int, int], mask: Path | None) -> Path:
        """Where the entry of ``image`` at ``bucket`` is stored on disk."""
        key = _key("latent", file_identity(image), self.masked, file_identity(mask) if mask else None, bucket,
                   self.model_fingerprint)
        return self.folder / "latents" / key[:2] / f"{key}.safetensors"

    def missing(self, image: Path, bucket: tuple[int, int], mask: Path | None) -> bool:
        """True when the entry must be computed (on disk: its file is absent or unreadable)."""
        if self.folder is None:
            return (image, bucket) not in self.memory
        path = self.file(image, bucket, mask)
        self.files[(image, bucket)] = path
        return not _complete(path, ("mean", "std", "crop") + (("mask",) if self.masked else ()))

    def put(self, image: Path, bucket: tuple[int, int], mask_file: Path | None, entry: LatentEntry) -> None:
        """Store an entry (on disk, it is not kept in memory)."""
        if self.folder is None:
            self.memory[(image, bucket)] = entry
            return
        tensors = {"mean": entry.mean, "std": entry.std,
                   "crop": torch.tensor([*entry.original_size, *entry.crop_corner], dtype=torch.int64)}
        if entry.mask is not None:
            tensors["mask"] = entry.mask
        path = self.file(image, bucket, mask_file)
        _write(path, tensors)
        self.files[(image, bucket)] = path

    def get(self, image: Path, bucket: tuple[int, int]) -> LatentEntry:
        """The entry of ``image`` at ``bucket`` (stored before training)."""
        if self.folder is None:
            return self.memory[(image, bucket)]
        path = self.files[(image, bucket)]
        tensors = _read(path)
        if tensors is None:
            from ..errors import CorruptFileError

            raise CorruptFileError(f"the cached latent {path} cannot be read any more",
                                   "Delete it (or the whole cache folder) and run again")
        crop = tensors["crop"].tolist()
        return LatentEntry(tensors["mean"], tensors["std"], tensors.get("mask"), (crop[0], crop[1]),
                           (crop[2], crop[3]))

    def __len__(self) -> int:
        return len(self.memory) + len(self.files)


class TextStore:
    """Caption embeddings by caption: a dictionary, or files under ``folder``."""

    def __init__(self, folder: Path | None = None, model_fingerprint: str = "") -> None:
        self.folder = folder
        self.model_fingerprint = model_fingerprint
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.known: set[str] = set()

    def _file(self, caption: str) -> Path:
        key = _key("text", caption, self.model_fingerprint)
        return self.folder / "text" / key[:2] / f"{key}.safetensors"

    def missing(self, caption: str) -> bool:
        """True when the caption's embedding must be computed."""
        if self.folder is None:
            return caption not in self.memory
        if not _complete(self._file(caption), ("hidden",)):
            return True
        self.known.add(caption)
        return False

    def put(self, caption: str, hidden: torch.Tensor, pooled: torch.Tensor | None) -> None:
        """Store one caption's embedding."""
        if self.folder is None:
            self.memory[caption] = (hidden, pooled)
            return
        tensors = {"hidden": hidden} if pooled is None else {"hidden": hidden, "pooled": pooled}
        _write(self._file(caption), tensors)
        self.known.add(caption)

    def __contains__(self, caption: str) -> bool:
        return caption in self.memory or caption in self.known

    def __bool__(self) -> bool:
        return bool(self.memory) or bool(self.known)

    def get(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embedding of a stored caption."""
        if self.folder is None:
            return self.memory[caption]
        tensors = _read(self._file(caption))
        if tensors is None:
            from ..errors import CorruptFileError

            raise CorruptFileError(f"the cached caption embedding {self._file(caption)} cannot be read any more",
                                   "Delete it (or the whole cache folder) and run again")
        return tensors["hidden"], tensors.get("pooled")
