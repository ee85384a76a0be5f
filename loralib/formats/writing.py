"""What writers share: completing the metadata, writing one safetensors file, and the result."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .. import metadata as meta
from ..files.atomic import check_output
from .base import SaveResult, WriteRequest

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter
    from ..files.writer import WrittenFile


def file_metadata(adapter: LoraAdapter, request: WriteRequest, default_title: str) -> meta.FileMetadata:
    """The metadata of a file written for ``request`` (its title defaults to ``default_title``)."""
    return meta.build(adapter, title=request.title or default_title, operation=request.operation)


def write_tensor_file(path: Path, tensors: Mapping[str, torch.Tensor], header: meta.FileMetadata, request: WriteRequest,
                      *, before: Mapping[str, str] | None = None, after: Mapping[str, str] | None = None) -> WrittenFile:
    """Write one safetensors file atomically with ``header``'s metadata (``before`` and ``after`` add
    entries around it), its self-describing hashes filled in; returns what identifies the file."""
    from ..files.writer import write_safetensors

    values = {**(before or {}), **header.values, **(after or {})}
    return write_safetensors(path, tensors, values, meta.SELF_HASHES, header.pending, finite=request.finite)


def write_single_file(adapter: LoraAdapter, path: Path, request: WriteRequest, format_name: str,
                      tensors: Mapping[str, torch.Tensor], *, before: Mapping[str, str] | None = None,
                      after: Mapping[str, str] | None = None) -> SaveResult:
    """The whole write of a one-file format: check the path, build the metadata, write, report."""
    check_output(path, force=request.force, inputs=request.inputs)
    header = file_metadata(adapter, request, path.stem)
    written = write_tensor_file(path, tensors, header, request, before=before, after=after)
    return SaveResult(path, format_name, [path], written.tensor_sha256, list(request.notes), header.completed_operation(),
                      _hashes=written.hashes)
