"""The shapes every format shares: what a format is, what readers produce, what writers return.

A format is one module of this package that exports a :class:`Format`: the names it is known
by, how its keys are spelled (for detection), the folder layout it uses, how to read it and how
to write it. :mod:`loralib.formats.table` lists them; nothing else names a format.

A reader turns the files behind an adapter (:class:`Inputs`) into an :class:`AdapterIndex`: for
every module, which tensors hold its factors and what its alpha is. ``inspect`` stops there;
``load`` then reads the tensors into a :class:`~loralib.adapter.LoraAdapter`. A writer turns an
adapter into files and returns a :class:`SaveResult`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..architectures import Detection, detect_architecture
from ..errors import CorruptFileError
from ..files.hashes import FileHashes
from .source import TensorSource

if TYPE_CHECKING:
    import torch

    from ..adapter import AdapterModule, LoraAdapter
    from ..records import OperationRecord


@dataclass(frozen=True)
class Kind:
    """What a file holds: a format (or another kind of file), and whether lorareg reads it as LoRA."""

    format: str
    title: str
    plain_lora: bool

    @property
    def is_adapter(self) -> bool:
        """True for any kind of adapter (plain LoRA or not); False for embeddings and checkpoints."""
        return self.format not in ("textual-inversion", "checkpoint")


@dataclass(frozen=True)
class FolderLayout:
    """The files of an adapter stored as a folder.

    ``weights`` are the tensor files' names, preferred first; ``config`` a file that must lie
    beside them (and marks a folder as this layout); ``subfolders`` hold one component each,
    laid out the same way.
    """

    weights: tuple[str, ...]
    config: str | None = None
    subfolders: tuple[str, ...] = ()

    def component_files(self, folder: Path) -> list[Path]:
        """The weights files of an adapter folder (top level first, then each component subfolder);
        where a config belongs, only files that have one beside them."""
        files = []
        for location in (folder, *(folder / sub for sub in self.subfolders)):
            for name in self.weights:
                if (location / name).is_file() and (self.config is None or (location / self.config).is_file()):
                    files.append(location / name)
                    break
        return files

    def holds(self, folder: Path) -> bool:
        """True when ``folder`` is laid out this way (its config at the top or in a component subfolder)."""
        if self.config is None:
            return any((folder / name).is_file() for name in self.weights)
        return any((place / self.config).is_file() for place in (folder, *(folder / s for s in self.subfolders)))

    def files(self, folder: Path) -> list[Path]:
        """Every file that belongs to the adapter in ``folder``: weights, and their configs."""
        weights = self.component_files(folder)
        configs = [f.parent / self.config for f in weights] if self.config else []
        return weights + configs


@dataclass
class Inputs:
    """The files behind one adapter path, and the configs that go with them.

    ``format`` is set when the folder layout alone says which format the files are in.
    """

    path: Path
    sources: list[TensorSource]
    configs: dict[Path, dict] = field(default_factory=dict)
    format: Format | None = None


@dataclass
class WriteRequest:
    """What every writer is asked besides the adapter and the path."""

    force: bool = False
    dtype: torch.dtype | None = None
    title: str | None = None
    operation: OperationRecord | None = None
    notes: list[str] = field(default_factory=list)
    inputs: tuple[Path, ...] = ()  # files the adapter was read from: never an output, even with force
    fused_rank: int | None = None  # cap on the rank of layers a format fuses (Flux/SD3 qkv), optimal approximation
    finite: bool = False  # refuse NaN/infinite values as they are written (see files.writer.write_safetensors)


@dataclass(frozen=True)
class Format:
    """One file format: its names, its key spellings, its layout, and how to read and write it.

    ``spellings`` are the key patterns detection counts, each with the :class:`Kind` a file
    mostly spelled that way is (most specific first: a key counts for the first pattern it
    matches, over every format in table order). ``read`` indexes :class:`Inputs` from headers;
    ``write`` writes an adapter (None for formats lorareg only reads). ``folder`` is the layout of
    an adapter stored as a folder, and ``read_config`` reads its config file.
    """

    name: str
    title: str
    spellings: tuple[tuple[Kind, re.Pattern[str]], ...]
    read: Callable[[Inputs], AdapterIndex]
    write: Callable[[LoraAdapter, Path, WriteRequest], SaveResult] | None = None
    folder: FolderLayout | None = None
    read_config: Callable[[Path], dict] | None = None
    writes_folder: bool = False  # the output path names a folder
    holds_embeddings: bool = False  # can carry textual-inversion tokens
    holds_cp_mid: bool = False  # can store CP-decomposed conv factors (lora_mid) as they are
    holds_kinds: frozenset[str] = frozenset({"lora"})  # module kinds it can store (see loralib.lycoris)

    @property
    def kinds(self) -> tuple[Kind, ...]:
        """Every kind detection may give a file of this format."""
        return tuple(dict.fromkeys(kind for kind, _ in self.spellings))


@dataclass
class ModuleEntry:
    """Where one module's factors are stored, and its alpha (kohya convention: scale = alpha / rank).

    A DoRA module is a LoRA entry with a ``magnitude`` tensor, whose ``magnitude_style`` (``peft``
    or ``lycoris``) says how it is laid out. Other kinds (LyCORIS LoHa, LoKr, …) are subclasses
    (:mod:`loralib.formats.lycoris`) that override the shape properties, :meth:`tensor_names` and
    :meth:`build`.
    """

    key: str
    source: TensorSource
    down: str
    up: str
    alpha: float | None = None  # None: alpha equals the rank
    mid: str | None = None
    magnitude: str | None = None  # DoRA: peft's lora_magnitude_vector or LyCORIS' dora_scale
    magnitude_style: str = "peft"
    bias: str | None = None  # a bias difference stored beside the factors (diff_b)
    rows: tuple[int, int] | None = None  # this module's rows of a fused layer's ``up`` (split on loading)
    swap: bool = False  # the file stores the two halves of the rows exchanged (shift/scale order)

    @property
    def kind(self) -> str:
        """The module kind: ``lora``, or ``dora`` with a magnitude."""
        return "lora" if self.magnitude is None else "dora"

    def tensor_names(self) -> list[str]:
        """Every tensor the module is built from."""
        return [n for n in (self.down, self.up, self.mid, self.magnitude, self.bias) if n]

    def build(self, tensors: Mapping[str, torch.Tensor]) -> AdapterModule:
        """The module, from its loaded tensors (by name)."""
        from ..adapter import LoraModule

        if (self.rows is not None or self.swap) and (self.magnitude or self.bias):  # their rows are taken too
            from dataclasses import replace

            from ..lycoris.rows import take_rows

            return take_rows(replace(self, rows=None, swap=False).build(tensors), self.row_blocks(self.stored_out))
        up = tensors[self.up]
        if self.rows is not None:  # the whole fused down with this module's rows of up: the same ΔW
            up = up[self.rows[0]: self.rows[1]]
        if self.swap:
            from .fusing import swap_halves

            up = swap_halves(up)
        module = LoraModule(tensors[self.down], up, self.effective_alpha,
                            tensors[self.mid] if self.mid else None, tensors[self.bias] if self.bias else None)
        if self.magnitude is None:
            return module
        from ..lycoris.kinds import dora

        return dora(module, tensors[self.magnitude], self.magnitude_style)

    @property
    def shares_factors(self) -> bool:
        """True for a plain LoRA part of a fused layer: the parts are split together from the shared factors."""
        return self.rows is not None and self.magnitude is None and self.bias is None

    @property
    def stored_out(self) -> int:
        """Output width of the stored (possibly fused) layer."""
        return int(self.source.shapes[self.up][0])

    def row_blocks(self, stored_out: int) -> tuple[tuple[int, int], ...]:
        """The stored layer's rows this module's ΔW is made of, in order (``rows``, or the halves exchanged)."""
        if self.rows is not None:
            return (self.rows,)
        if self.swap:
            half = stored_out // 2
            return ((half, stored_out), (0, half))
        return ((0, stored_out),)

    @property
    def rank(self) -> int:
        """The module's rank, from the ``down`` tensor's shape."""
        return int(self.source.shapes[self.down][0])

    @property
    def in_features(self) -> int:
        """Input width of the adapted layer (after folding a CP mid, the same)."""
        return int(self.source.shapes[self.down][1])

    @property
    def out_features(self) -> int:
        """Output width of the adapted layer (its rows of a fused layer)."""
        return self.rows[1] - self.rows[0] if self.rows else int(self.source.shapes[self.up][0])

    @property
    def is_conv(self) -> bool:
        """True for a conv (LoCon) module."""
        return len(self.source.shapes[self.down]) == 4

    @property
    def effective_alpha(self) -> float:
        """Alpha with the "missing means rank" rule applied."""
        return float(self.rank) if self.alpha is None else self.alpha

    @property
    def dtype(self) -> str:
        """Stored dtype of the ``down`` factor."""
        return self.source.dtypes[self.down]

    def check_shapes(self) -> None:
        """Raise if the stored factor shapes cannot form a LoRA module (or its alpha is not finite)."""
        down, up = self.source.shapes[self.down], self.source.shapes[self.up]
        ok = len(down) in (2, 4) and len(up) == len(down) and up[1] == down[0] and down[0] > 0
        if ok and self.rows is not None:
            ok = len(down) == 2 and 0 <= self.rows[0] < self.rows[1] <= up[0]
        if ok and self.swap:
            ok = up[0] % 2 == 0
        if ok and self.mid is not None:
            mid = self.source.shapes[self.mid]
            ok = len(mid) == 4 and tuple(mid[:2]) == (down[0], down[0])
        if not ok:
            raise CorruptFileError(
                f"{self.source.path.name}: module {self.key[:200]} has factors of shapes {list(down)[:6]} and "
                f"{list(up)[:6]} that do not multiply", "The file is damaged or was written by a broken converter")
        if 0 in down or 0 in up:
            raise CorruptFileError(
                f"{self.source.path.name}: module {self.key[:200]} has an empty factor (shapes {list(down)} and "
                f"{list(up)}): it adapts a layer of width 0", "The file is damaged or was written by a broken converter")
        if self.magnitude is not None:
            from ..lycoris.shapes import magnitude_axis

            try:
                stored = (int(up[0]), *self.weight_shape[1:])  # a fused layer's magnitude covers all its rows
                axis = magnitude_axis(self.source.shapes[self.magnitude], stored, self.magnitude_style)
            except CorruptFileError as exc:
                raise CorruptFileError(f"{self.source.path.name}: module {self.key[:200]}: {exc.message}",
                                       "The file is damaged or was written by a broken converter") from exc
            self.check_rows("lora", {}, axis)
        self.check_alpha()

    def check_rows(self, family: str, shapes: dict[str, tuple[int, ...]], axis: str | None) -> None:
        """Raise when this module's rows of a fused layer cannot be taken exactly (one line naming it)."""
        if self.rows is None and not self.swap:
            return
        from ..errors import UnsupportedFormatError
        from ..lycoris.rows import row_blocks_error

        reason = row_blocks_error(family, shapes, self.stored_out, self.row_blocks(self.stored_out), axis)
        if reason is not None:
            raise UnsupportedFormatError(
                f"{self.source.path.name}: module {self.key[:200]} is part of a fused layer, but {reason}",
                "lorareg will not split it inexactly; convert the adapter with the tool that trained it")

    def check_alpha(self) -> None:
        """Raise if the module's alpha is NaN or infinite (no operation could use it)."""
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise CorruptFileError(f"{self.source.path.name}: module {self.key[:200]} has alpha {self.alpha}",
                                   "A scale that is not a finite number makes the adapter unusable")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the adapted layer's weight."""
        down = self.source.shapes[self.down]
        if len(down) != 4:
            return (self.out_features, int(down[1]))
        kernel = self.source.shapes[self.mid][2:] if self.mid else down[2:]
        return (self.out_features, int(down[1]), *(int(k) for k in kernel))


@dataclass
class AdapterIndex:
    """Everything a reader learned from headers: format, modules, metadata, extra tensors."""

    kind: Kind
    sources: list[TensorSource]
    modules: dict[str, ModuleEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, tuple[TensorSource, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    family: str | None = None  # what the file's own names say (``flux`` for BFL names, ``sd3`` for MMDiT ones)

    @property
    def architecture(self) -> Detection:
        """The base architecture, decided from module keys and widths (metadata only breaks ties)."""
        return detect_architecture({k: e.in_features for k, e in self.modules.items()}, self.metadata, self.family)

    @property
    def path(self) -> Path:
        """The file or folder the adapter was read from."""
        return self.sources[0].path

    def rank_counts(self) -> Counter:
        """How many modules have each rank (kinds without one are left out)."""
        return Counter(e.rank for e in self.modules.values() if e.rank is not None)

    def alpha_counts(self) -> Counter:
        """How many modules have each alpha."""
        return Counter(e.effective_alpha for e in self.modules.values() if e.effective_alpha is not None)

    def kind_counts(self) -> Counter:
        """How many modules of each kind (``lora``, ``loha``, ``lokr``, ``full``, ``norm``, ``dora``)."""
        return Counter(e.kind for e in self.modules.values())


@dataclass
class SaveResult:
    """What a writer wrote: the adapter's main file, every file, the main file's tensor hash, and
    the operation record as written into the file (input hashes resolved).

    Writers pass what they know from writing (``_hashes``: the main file's hashes, with the
    identity of the whole adapter, or a function giving them — the whole-file SHA-256 is one more
    pass over the bytes, made only when someone asks)."""

    path: Path
    format: str
    files: list[Path]
    tensor_sha256: str
    notes: list[str] = field(default_factory=list)
    operation: OperationRecord | None = None
    _hashes: FileHashes | Callable[[], FileHashes] | None = field(default=None, repr=False)

    @property
    def hashes(self) -> FileHashes:
        """Every hash of the main file, with the whole adapter's identity (computed from the files
        on first use when the writer did not pass them)."""
        if self._hashes is None:
            from ..files.hashes import hash_file

            self._hashes = hash_file(self.path)
        elif callable(self._hashes):
            self._hashes = self._hashes()
        return self._hashes
