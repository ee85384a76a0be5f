"""Reading any supported adapter file into a :class:`~loralib.adapter.LoraAdapter`, and writing one.

The formats are listed in :mod:`loralib.formats.table`, one module each (kohya, LyCORIS, PEFT,
diffusers in every generation, cloneofsimo, ComfyUI/BFL, OneTrainer's INTERNAL and ORIGINAL
spellings, OMI, XLabs); :mod:`~loralib.formats.layout` knows which files make up an adapter,
:mod:`~loralib.formats.detect` which format a file is in, and :mod:`~loralib.formats.fusing`
splits and fuses the layers some spellings fuse (Flux's and SD3's ``qkv``). Everything else that
looks like a model file is named precisely in the error.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InvalidArgumentError, NotALoraError, UnsupportedFormatError
from .base import AdapterIndex, Format, Inputs, Kind, SaveResult, WriteRequest
from .detect import identify, looks_like_broken_lora
from .layout import open_inputs
from .table import FORMATS, WRITE_FORMATS, by_name, for_kind

if TYPE_CHECKING:
    import torch

    from ..adapter import LoraAdapter
    from ..files.hashes import FileHashes
    from ..records import OperationRecord

__all__ = ["FORMATS", "WRITE_FORMATS", "AdapterIndex", "Format", "Inputs", "Kind", "SaveResult", "convert",
           "identify_inputs", "index_adapter", "index_inputs", "input_files", "load_adapter", "open_inputs", "refuse",
           "refuse_nonfinite", "save_adapter", "writer"]


def identify_inputs(inputs: Inputs) -> Kind:
    """What the inputs hold; raises a precise error when it is nothing lorareg recognises."""
    if inputs.format is not None:
        return inputs.format.kinds[0]
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
    """Raise the error for a recognised file that lorareg does not read as an adapter."""
    if not kind.is_adapter:
        raise NotALoraError(f"{name} is not a LoRA adapter: it is a {kind.title}")
    raise UnsupportedFormatError(
        f"{name} is a {kind.title}, which lorareg recognises but cannot apply or convert",
        "lorareg reads LoRA, LoCon, LoHa, LoKr, full-rank and norm differences and DoRA; inspect still works")


def index_inputs(inputs: Inputs, kind: Kind) -> AdapterIndex:
    """Index the inputs of a known kind (headers only)."""
    fmt = for_kind(kind)
    if fmt is None:
        refuse(kind, inputs.path.name)
    return fmt.read(inputs)


def index_adapter(path: str | Path, *, allow_pickle: bool = False) -> AdapterIndex:
    """Index the adapter at ``path`` from its headers, without loading tensors."""
    inputs = open_inputs(path, allow_pickle=allow_pickle)
    return index_inputs(inputs, identify_inputs(inputs))


def load_adapter(path: str | Path, *, allow_pickle: bool = False, hashes: FileHashes | None = None) -> LoraAdapter:
    """Load the LoRA adapter at ``path`` (a file or a PEFT/diffusers folder), in any readable format.

    The hashes of its files (its identity and tensor hash, which operation records name it by)
    are computed in a background thread while the tensors load, unless ``hashes`` gives them
    already (a catalog's record of this unchanged file). Tensors are views of the memory-mapped
    files; :meth:`LoraAdapter.release` lets go of a module's memory once used.
    """
    from ..adapter import LoraAdapter
    from ..compose.parallel import single_threaded_torch
    from ..files.hashes import Deferred, hash_adapter_files
    from .fusing import split

    index = index_adapter(path, allow_pickle=allow_pickle)
    headers = [s.header for s in index.sources]
    if hashes is not None:
        identity = Deferred.ready(hashes)
    else:
        identity = Deferred(hash_adapter_files, headers) if all(h is not None for h in headers) else None
    tensors = {}
    for source in index.sources:
        wanted = [n for e in index.modules.values() if e.source is source for n in e.tensor_names()]
        wanted += [n for s, n in index.embeddings.values() if s is source]
        tensors[id(source)] = source.load(list(dict.fromkeys(wanted)))
    modules = {}
    fused: dict[tuple[int, str], list] = {}
    for key, e in index.modules.items():
        if e.shares_factors:
            fused.setdefault((id(e.source), e.up), []).append(e)
        else:
            modules[key] = e.build(tensors[id(e.source)])
    with single_threaded_torch():  # small memory-bound work; torch's threads only wait on each other
        for entries in fused.values():
            first = entries[0]
            loaded = tensors[id(first.source)]
            entries.sort(key=lambda e: e.rows)
            parts = split(loaded[first.down], loaded[first.up], first.effective_alpha, [e.rows for e in entries])
            modules.update({e.key: part for e, part in zip(entries, parts) if part is not None})
    modules = {key: modules[key] for key in index.modules if key in modules}
    embeddings = {token: tensors[id(s)][n] for token, (s, n) in index.embeddings.items()}
    entries = index.modules

    def release(key: str) -> None:
        entry = entries.get(key)
        if entry is not None:
            entry.source.release(entry.tensor_names())

    return LoraAdapter(modules, index.architecture.name, index.kind.format, dict(index.metadata),
                       embeddings, Path(path), source_hash=identity, releaser=release)


def writer(format: str) -> Format:
    """The format called ``format`` that lorareg can write, or :class:`InvalidArgumentError`."""
    fmt = by_name(format)
    if fmt is None or fmt.write is None:
        raise InvalidArgumentError(f"unknown output format {format!r}", f"Choose one of {', '.join(WRITE_FORMATS)}")
    return fmt


def save_adapter(adapter: LoraAdapter, path: str | Path, format: str = "kohya", *, force: bool = False,
                 dtype: torch.dtype | None = None, drop_embeddings: bool = False,
                 operation: OperationRecord | None = None, title: str | None = None,
                 allow_nonfinite: bool = False, inputs: Iterable[str | Path] = (),
                 fused_rank: int | None = None) -> SaveResult:
    """Write ``adapter`` to ``path`` in ``format`` (``kohya``, ``comfyui``, ``peft`` or ``diffusers``), atomically.

    An existing output is replaced only with ``force``; an output that is one of the adapter's
    inputs (its source file, the inputs of ``operation``, or ``inputs``) never. Factors with NaN
    or infinite values (in the stored dtype) are refused unless ``allow_nonfinite``: no consumer
    can use them. ``operation`` describes how the adapter was made; it is appended to the file's
    ``lorareg.history`` and returned, input hashes resolved, as the result's ``operation``.
    ``title`` is the ModelSpec title of a new adapter (default: the file's name). ``fused_rank``
    caps the rank of the layers a format fuses (Flux's and SD3's ``qkv``, Flux's ``linear1``) at
    the optimal approximation of that rank; without it they are fused exactly (block-diagonally
    when the parts have their own ``down``).
    """
    fmt = writer(format)
    if not adapter.modules:
        raise InvalidArgumentError("the adapter has no modules; there is nothing to write")
    notes = []
    if adapter.embeddings and not fmt.holds_embeddings:
        if not drop_embeddings:
            raise UnsupportedFormatError(
                f"the adapter carries textual-inversion tokens ({', '.join(adapter.embeddings)}) that the "
                f"{fmt.name} format cannot hold",
                "Write kohya format (A1111 reads them as bundled embeddings), or pass --drop-embeddings to leave them out")
        notes.append(f"left out textual-inversion tokens: {', '.join(adapter.embeddings)}")
    refuse_kinds(adapter, fmt)
    if not fmt.holds_cp_mid and any(getattr(m, "mid", None) is not None for m in adapter.modules.values()):
        notes.append("folded CP-decomposed conv factors (lora_mid) into lora_down; ΔW is unchanged")
    if fused_rank is not None and fused_rank < 1:
        raise InvalidArgumentError(f"the rank of fused layers must be at least 1, not {fused_rank}")
    sources = input_files([*inputs, *([adapter.source_path] if adapter.source_path else []),
                           *(i.path for i in (operation.inputs if operation else []) if i.path)])
    request = WriteRequest(force, dtype, title, operation, notes, sources, fused_rank, finite=not allow_nonfinite)
    from ..files.writer import NonFiniteTensor

    try:
        return fmt.write(adapter, Path(path), request)
    except NonFiniteTensor as exc:  # found while writing (nothing was left behind): name every such module
        refuse_nonfinite(adapter, dtype)
        raise CorruptFileError(f"{exc}; it cannot be written",
                               "Pass --allow-nonfinite (Python: allow_nonfinite=True) to write it anyway") from exc


def refuse_nonfinite(adapter: LoraAdapter, dtype: torch.dtype | None = None) -> None:
    """Raise :class:`CorruptFileError` naming the modules whose factors hold NaN or infinite values
    once stored in ``dtype`` (the adapter's own dtype when None).

    Writers check the values as they write them (:class:`WriteRequest`'s ``finite``); this names
    every failing module once one is found."""
    bad = adapter.nonfinite_modules(dtype)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        stored = f" once stored as {str(dtype).removeprefix('torch.')}" if dtype is not None else ""
        raise CorruptFileError(
            f"{len(bad)} module(s) would hold NaN or infinite values{stored}: {shown}",
            "Such an adapter breaks every image it is used for; pass --allow-nonfinite "
            "(Python: allow_nonfinite=True) to write it anyway")


def input_files(paths: Iterable[str | Path]) -> tuple[Path, ...]:
    """Every file behind the given adapter paths (a PEFT folder: the folder, its weights and configs)."""
    from .layout import adapter_files, adapter_root

    found: list[Path] = []
    for item in paths:
        path = Path(item)
        root = adapter_root(path) if path.is_file() else path
        found += [path, root, *adapter_files(root)] if root.exists() else [path]
    return tuple(dict.fromkeys(found))


def refuse_kinds(adapter: LoraAdapter, fmt: Format) -> None:
    """Raise when ``adapter`` has module kinds that ``fmt`` cannot store (LoHa in PEFT, …)."""
    kinds = dict(adapter.kinds)
    biased = sum(1 for m in adapter.modules.values() if m.kind != "full" and m.bias_delta() is not None)
    if biased:
        kinds["bias"] = biased
    foreign = {kind: count for kind, count in kinds.items() if kind not in fmt.holds_kinds}
    if not foreign:
        return
    from ..lycoris import KIND_TITLES

    titles = {**KIND_TITLES, "bias": "bias difference (diff_b)"}
    named = ", ".join(f"{count} {titles[kind]}" for kind, count in foreign.items())
    raise UnsupportedFormatError(
        f"the {fmt.name} format cannot hold the adapter's {named} module(s)",
        "Write kohya format (LyCORIS keys, which ComfyUI, A1111 and Forge load), or make a plain LoRA with "
        "convert --plain or --rank N")


def convert(source: str | Path, output: str | Path, format: str = "kohya", *, force: bool = False,
            dtype: torch.dtype | None = None, drop_embeddings: bool = False, allow_pickle: bool = False,
            allow_nonfinite: bool = False, fused_rank: int | None = None,
            source_hashes: FileHashes | None = None) -> SaveResult:
    """Convert the adapter at ``source`` to ``format`` at ``output``; ``ΔW`` of every module is unchanged
    (unless ``fused_rank`` asks for a lower rank of fused layers, see :func:`save_adapter`).
    ``source_hashes`` are the source's hashes when already known (see :func:`load_adapter`).

    Refused before anything is read: an output that is the source itself (any spelling of it).
    """
    from ..files.atomic import refuse_input_as_output
    from ..metadata import input_record
    from ..records import OperationRecord

    fmt = writer(format)
    refuse_input_as_output(output, input_files([source]))
    adapter = load_adapter(source, allow_pickle=allow_pickle, hashes=source_hashes)
    params = {"from_format": adapter.source_format, "to_format": fmt.name}
    if fused_rank is not None:
        params["fused_rank"] = fused_rank
    operation = OperationRecord("convert", [input_record(adapter)], params)
    return save_adapter(adapter, output, fmt.name, force=force, dtype=dtype, drop_embeddings=drop_embeddings,
                        operation=operation, allow_nonfinite=allow_nonfinite, fused_rank=fused_rank)
