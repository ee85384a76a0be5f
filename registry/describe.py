"""What the catalog learns from an adapter file: its header facts, hashes, fingerprint, size and mtime.

Only the header is parsed (``loralib.inspect``); the bytes are read once, through a memory map, to
hash them and to fingerprint the ΔW of a plain LoRA (:mod:`loralib.fingerprint`). torch is never
imported.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from loralib.errors import InvalidArgumentError
from loralib.files.hashes import Deferred, FileHashes, hash_adapter_files
from loralib.fingerprint import BANDS
from loralib.formats.layout import adapter_root, main_file, open_inputs
from loralib.inspection import InspectReport, caption_tags, format_number, inspect, top_tags
from loralib.jsontext import loads_metadata
from loralib.metadata import HISTORY_KEY, history

from .paths import absolute, storable
from .records import dumps, unique

BAND_COLUMNS = tuple(f"fp_band{i}" for i in range(BANDS))
TOP_TAGS = 5
KEYWORD_TAGS = 50
# Metadata entries whose values are hashes, images or bulky numeric JSON: not worth searching.
_UNSEARCHED = {"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", "modelspec.thumbnail", "ss_bucket_info",
               "ss_datasets", "ss_tag_frequency", "ss_dataset_dirs", "ss_reg_dataset_dirs", HISTORY_KEY}
_NOT_WORDS = re.compile(r"^([-+]?[\d.eE+-]+|true|false|none|null|[0-9a-fA-Fx]{16,}|[\[{].*)$", re.DOTALL | re.IGNORECASE)
GENERIC_STEMS = {"pytorch_lora_weights", "adapter_model", "diffusion_pytorch_model", "model", "lora"}


@dataclass
class FileFacts:
    """An adapter file as the catalog records it."""

    path: Path  # the main file (hashed; size and mtime recorded)
    root: Path  # what loaders are given: the file, or a PEFT folder
    size: int
    mtime_ns: int
    report: InspectReport
    hashes: dict[str, str]

    @property
    def tensor_sha256(self) -> str:
        """The SHA-256 of the main file's tensor data (AutoV3, the A1111 hash)."""
        return self.hashes["tensor_sha256"]

    @property
    def identity(self) -> str:
        """The adapter's identity: its content as stored, metadata left out."""
        return self.hashes["identity"]

    @property
    def metadata(self) -> dict[str, str]:
        """The file's safetensors metadata."""
        return self.report.metadata

    def default_name(self) -> str:
        """A name for a new entry: the file's stem, or its folder's name for generic file names."""
        stem = self.root.name if self.root.is_dir() else self.root.stem
        if stem.lower() in GENERIC_STEMS and not self.root.is_dir():
            stem = self.root.parent.name or stem
        return clean_name(stem) or self.tensor_sha256[:12]

    def file_triggers(self) -> list[str]:
        """Trigger words the file itself names: ModelSpec's trigger phrase, then kohya's most frequent tags."""
        phrase = self.metadata.get("modelspec.trigger_phrase", "")
        words = [w.strip() for w in phrase.split(",") if w.strip()]
        return unique(words + caption_tags(self.metadata, TOP_TAGS))

    def columns(self) -> dict:
        """The ``adapters`` columns that come from the file (refreshed whenever the file changes)."""
        r = self.report
        dtypes = Counter(r.dtypes)
        meta = self.metadata
        fingerprint = r.fingerprint if not r.damaged else None
        note = r.fingerprint_note or (f"the file is damaged ({r.problems[0]})" if r.damaged and r.problems else None)
        return {
            "identity": self.identity, "tensor_sha256": self.tensor_sha256, "sha256": self.hashes.get("sha256"),
            "legacy": self.hashes.get("legacy"),
            "fingerprint": fingerprint.to_bytes() if fingerprint is not None else None,
            "fp_norm": fingerprint.norm if fingerprint is not None else None,
            "fp_modules": fingerprint.modules if fingerprint is not None else None,
            "fp_note": None if fingerprint is not None else (note or "not computed"),
            **dict(zip(BAND_COLUMNS, fingerprint.bands() if fingerprint is not None else [None] * BANDS)),
            "format": r.format, "architecture": r.architecture, "plain_lora": int(r.plain_lora),
            "components": dumps(r.components), "modules": r.modules,
            "ranks": dumps({str(k): v for k, v in r.ranks.items()}),
            "alphas": dumps({format_number(k): v for k, v in r.alphas.items()}),
            "dtype": dtypes.most_common(1)[0][0] if dtypes else None, "size": r.file_size, "tensors": r.tensors,
            "parameters": r.parameters, "title": meta.get("modelspec.title") or meta.get("ss_output_name"),
            "metadata": dumps(meta), "keywords": metadata_keywords(meta), "damaged": int(r.damaged),
            "problems": dumps(r.problems),
        }

    def row(self) -> FileRow:
        """What the catalog stores of this file, computed once: small and plain, so a scan's worker
        processes pass it back cheaply (see :class:`FileRow`)."""
        return FileRow(str(self.path), str(self.root), self.size, self.mtime_ns, self.identity, self.tensor_sha256,
                       self.hashes.get("sha256"), self.report.format, bool(self.report.damaged), self.columns(),
                       self.default_name(), self.file_triggers(), self.metadata)


class FileRow(NamedTuple):
    """The facts of a described file that :meth:`Catalog.add_many` stores, without the header
    report they were drawn from (a tuple of plain values: it pickles in a few microseconds)."""

    path: str  # the main file
    root: str  # the file, or its PEFT folder
    size: int
    mtime_ns: int
    identity: str
    tensor_sha256: str
    sha256: str | None
    format: str
    damaged: bool
    columns: dict  # FileFacts.columns()
    default_name: str  # FileFacts.default_name()
    file_triggers: list[str]  # FileFacts.file_triggers()
    metadata: dict[str, str]


def describe(path: str | os.PathLike, hashes: FileHashes | Deferred | None = None, *,
             fingerprint: bool = True) -> FileFacts:
    """Read the header of the adapter at ``path`` (a file or a PEFT/diffusers folder), hash its
    files and fingerprint its ΔW (``fingerprint=False`` skips that), reading the bytes once.

    ``hashes`` may be passed when they are already known (a writer computed them: its main file's,
    with the whole adapter's identity), or as a :class:`~loralib.files.hashes.Deferred` still being
    computed, which the fingerprint then overlaps. Raises :class:`~loralib.errors.LoraError`
    subclasses for files that are not adapters or are unreadable.
    """
    given = absolute(path)
    if not storable(given):
        raise InvalidArgumentError(f"the path {os.fsencode(given)!r} is not valid UTF-8, which the catalog cannot store",
                                   "Rename the file (or its folder)")
    root = adapter_root(given) if given.is_file() else given
    if isinstance(hashes, FileHashes) and hashes.identity is None:
        hashes = None  # without the whole adapter's identity: the files are hashed here
    report = inspect(root, hashes=hashes is None, fingerprint=fingerprint)  # while a Deferred still hashes
    known = hashes.result() if isinstance(hashes, Deferred) else hashes
    if known is not None and known.identity is None:
        report, known = inspect(root, hashes=True, fingerprint=fingerprint), None
    found = dict(report.hashes) if known is None else known.to_dict()
    first = report.files[0] if report.files else None
    main = root if first == str(root) else absolute(first) if first else main_file(root)
    stat = main.stat()
    report.hashes = found
    return FileFacts(main, root, stat.st_size, stat.st_mtime_ns, report, found)


def adapter_hashes(path: str | os.PathLike) -> FileHashes:
    """The hashes of the adapter stored at ``path`` (a file, or a folder adapter or one of its files):
    its main file's, with the identity of all its files. Headers and bytes only, no fingerprint."""
    given = absolute(path)
    root = adapter_root(given) if given.is_file() else given
    headers = [s.header for s in open_inputs(root).sources]
    return hash_adapter_files(headers)


def metadata_keywords(metadata: dict[str, str]) -> str:
    """The searchable words of a file's metadata.

    Textual values (titles, base model names, optimizer, notes…), the dataset folder names, the
    50 most frequent caption tags and the operations and input files of ``lorareg.history``;
    not hashes, numbers, thumbnails or bulky JSON, which would only slow the index down.
    """
    words = [v.strip() for k, v in metadata.items()
             if k not in _UNSEARCHED and len(v) < 500 and not _NOT_WORDS.match(v.strip())]
    words += top_tags(metadata, KEYWORD_TAGS)
    folders = loads_metadata(metadata.get("ss_dataset_dirs"), {})
    words += list(folders) if isinstance(folders, dict) else []
    for record in history(metadata):
        if isinstance(record, dict):
            words.append(str(record.get("operation", "")))
            words += [str(i.get("file")) for i in record.get("inputs", []) if isinstance(i, dict) and i.get("file")]
    return " ".join(unique([w for w in words if w]))


def clean_name(text: str) -> str:
    """``text`` made usable as a catalog name: slashes and control characters replaced, spaces trimmed."""
    text = re.sub(r"[\x00-\x1f\x7f/\\]", "_", text)
    return " ".join(text.split())


