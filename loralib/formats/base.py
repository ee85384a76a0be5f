"""What readers produce before any tensor is loaded, and what writers return.

A reader turns one or more :class:`~loralib.formats.source.TensorSource` into an
:class:`AdapterIndex`: for every module, which tensors hold its factors and what its alpha is.
``inspect`` stops there; ``load`` then reads the tensors into a :class:`~loralib.adapter.LoraAdapter`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..architectures import Detection, detect_architecture
from ..errors import CorruptFileError
from ..files.hashes import FileHashes
from .detect import Kind
from .source import TensorSource


@dataclass
class ModuleEntry:
    """Where one module's factors are stored, and its alpha (kohya convention: scale = alpha / rank)."""

    key: str
    source: TensorSource
    down: str
    up: str
    alpha: float | None = None  # None: alpha equals the rank
    mid: str | None = None

    @property
    def rank(self) -> int:
        """The module's rank, from the ``down`` tensor's shape."""
        return int(self.source.shapes[self.down][0])

    @property
    def in_features(self) -> int:
        """Input width of the adapted layer (after folding a CP mid, the same)."""
        return int(self.source.shapes[self.down][1])

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
        """Raise if the stored factor shapes cannot form a LoRA module."""
        down, up = self.source.shapes[self.down], self.source.shapes[self.up]
        ok = len(down) in (2, 4) and len(up) == len(down) and up[1] == down[0] and down[0] > 0
        if ok and self.mid is not None:
            mid = self.source.shapes[self.mid]
            ok = len(mid) == 4 and tuple(mid[:2]) == (down[0], down[0])
        if not ok:
            raise CorruptFileError(
                f"{self.source.path.name}: module {self.key} has factors of shapes {list(down)} and {list(up)} "
                "that do not multiply", "The file is damaged or was written by a broken converter")


@dataclass
class AdapterIndex:
    """Everything a reader learned from headers: format, modules, metadata, extra tensors."""

    kind: Kind
    sources: list[TensorSource]
    modules: dict[str, ModuleEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, tuple[TensorSource, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def architecture(self) -> Detection:
        """The base architecture, decided from module keys and widths."""
        return detect_architecture({k: e.in_features for k, e in self.modules.items()})

    @property
    def path(self) -> Path:
        """The file or folder the adapter was read from."""
        return self.sources[0].path

    def rank_counts(self) -> Counter:
        """How many modules have each rank."""
        return Counter(e.rank for e in self.modules.values())

    def alpha_counts(self) -> Counter:
        """How many modules have each alpha."""
        return Counter(e.effective_alpha for e in self.modules.values())


@dataclass
class SaveResult:
    """What a writer wrote: the adapter's main file, every file, and the main file's tensor hash."""

    path: Path
    format: str
    files: list[Path]
    tensor_sha256: str
    notes: list[str] = field(default_factory=list)
    _hashes: FileHashes | None = field(default=None, repr=False)

    @property
    def hashes(self) -> FileHashes:
        """Every hash of the main file (the whole-file SHA-256 is computed on first use)."""
        if self._hashes is None:
            from ..files.hashes import hash_file

            self._hashes = hash_file(self.path)
        return self._hashes
