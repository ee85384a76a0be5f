"""Where an adapter's tensors come from: a safetensors file read lazily, or an in-memory dict.

Readers see only names, shapes, dtypes and metadata until an adapter is actually loaded, so
``inspect`` and the catalog never load a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files.header import SafetensorsHeader, read_header


@dataclass
class TensorSource:
    """One file's tensors: names, shapes, dtypes and metadata, with tensors loaded on request."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str] = field(default_factory=dict)
    header: SafetensorsHeader | None = None
    tensors: dict[str, Any] | None = None  # set for in-memory sources (opted-in pickle files)
    mapped: Any = field(default=None, repr=False)  # the MappedFile its loaded tensors view

    @classmethod
    def from_safetensors(cls, path: str | Path) -> TensorSource:
        """A source over a safetensors file; only its header is read."""
        header = read_header(path)
        return cls(header.path, {n: t.shape for n, t in header.tensors.items()},
                   {n: t.dtype for n, t in header.tensors.items()}, header.metadata, header=header)

    @classmethod
    def from_state_dict(cls, path: str | Path, state_dict: dict[str, Any], metadata: dict[str, str] | None = None) -> TensorSource:
        """A source over tensors already in memory (from a pickle file the user opted to read)."""
        from ..dtypes import to_safetensors

        tensors = {k: v for k, v in state_dict.items() if hasattr(v, "shape")}
        return cls(Path(path), {k: tuple(v.shape) for k, v in tensors.items()},
                   {k: to_safetensors(v.dtype) or str(v.dtype) for k, v in tensors.items()},
                   metadata or {}, tensors=tensors)

    @property
    def names(self) -> list[str]:
        """All tensor names."""
        return list(self.shapes)

    @property
    def is_truncated(self) -> bool:
        """True when the file ends before its tensor data does."""
        return self.header is not None and self.header.is_truncated

    def scalars(self, names: list[str]) -> dict[str, float]:
        """The values of one-element tensors (such as alphas), read without loading others."""
        if self.tensors is not None:
            return {name: float(self.tensors[name].reshape(-1)[0]) for name in names}
        return self.header.read_scalars(names)

    def load(self, names: list[str]) -> dict[str, Any]:
        """Load the named tensors as torch tensors (views of the memory-mapped file)."""
        if self.tensors is not None:
            return {n: self.tensors[n] for n in names}
        from ..files.reader import MappedFile, read_tensors

        self.mapped = self.mapped or MappedFile(self.header)
        return read_tensors(self.header, names, self.mapped)

    def release(self, names: list[str]) -> None:
        """Let go of the memory of loaded tensors that will not be read again soon (see
        :meth:`loralib.files.reader.MappedFile.release`; they stay valid)."""
        if self.mapped is not None:
            self.mapped.release(names)

