"""Load tensors from a safetensors file whose header was validated.

Tensors are views of the file mapped into memory (copy-on-write, so nothing can write to the
file): reading costs no copy, and pages are read from the page cache only when touched. A caller
that is done with some tensors can :meth:`MappedFile.release` them: their pages leave this
process's memory (they are read from the file again if touched later), which keeps the memory of
an operation that streams module by module bounded by the modules in flight.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable

import torch

from ..dtypes import SAFETENSORS_DTYPES
from ..errors import CorruptFileError
from .header import SafetensorsHeader
from .pages import drop_pages


class MappedFile:
    """A safetensors file mapped into memory, handing out its tensors as views."""

    def __init__(self, header: SafetensorsHeader) -> None:
        header.require_complete()
        self.header = header
        try:
            with open(header.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise CorruptFileError(f"{header.path.name} could not be read: {exc}", "The file may be damaged") from exc
        if len(self._map) < header.data_start + header.data_size:  # it shrank after its header was read
            raise CorruptFileError(f"{header.path.name} is shorter than its header says", "The file may be damaged")

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a view of the mapped file (a copy where its bytes are misaligned)."""
        info = self.header.tensors[name]
        dtype = getattr(torch, SAFETENSORS_DTYPES[info.dtype])
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        start = self.header.data_start + info.begin
        if start % dtype.itemsize:
            return torch.frombuffer(bytearray(self._map[start:start + info.nbytes]), dtype=dtype).reshape(info.shape)
        return torch.frombuffer(self._map, dtype=dtype, count=info.numel, offset=start).reshape(info.shape)

    def release(self, names: Iterable[str]) -> None:
        """Drop the pages that only these tensors occupy from this process's memory (not from the file)."""
        for name in names:
            info = self.header.tensors.get(name)
            if info is not None:
                drop_pages(self._map, self.header.data_start + info.begin, info.nbytes)


def read_tensors(header: SafetensorsHeader, names: Iterable[str], mapped: MappedFile | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of the file ``header`` describes, as CPU tensors viewing the mapped file."""
    mapped = mapped or MappedFile(header)
    try:
        return {name: mapped.tensor(name) for name in names}
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CorruptFileError(f"{header.path.name} could not be read: {exc}", "The file may be damaged") from exc

