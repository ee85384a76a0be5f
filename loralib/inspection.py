"""Describe an adapter file from its header alone: ``loralib.inspect(path)``.

No tensor is loaded (a few scalar alphas are read straight from the file), so this is fast on
any file and works on damaged ones, which are described and flagged. Hashing and the ΔW
fingerprint (:mod:`loralib.fingerprint`) read each file's bytes once, through one memory map.
"""

from __future__ import annotations

import functools
import heapq
import math
import mmap
import operator
import os
import re
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .architectures import ARCHITECTURES, COMPONENTS, SD, SDXL, UNKNOWN, claimed_architecture, detect_architecture
from .errors import UnsafeFileError
from .files.hashes import folder_identity, hash_mapped
from .files.header import SafetensorsHeader
from .files.pages import drop_pages
from .formats import AdapterIndex, Inputs, identify_inputs, index_inputs, open_inputs, refuse
from .formats.detect import Kind, name_family
from .formats.source import TensorSource
from .formats.table import for_kind
from .jsontext import loads_metadata
from .lycoris import KIND_TITLES
from .naming.kohya import resolve_module_name
from .naming.sgm import UNetLayout

_KOHYA_MODULE = re.compile(r"^(lora_(?:unet|te|te1|te2|te3|transformer)_\w+)\.")


@dataclass
class InspectReport:
    """Everything ``inspect`` knows about one adapter."""

    path: str
    files: list[str]
    file_size: int
    format: str
    format_title: str
    plain_lora: bool
    architecture: str
    architecture_evidence: str
    metadata_claims: str | None
    modules: int
    components: dict[str, int]
    linear_modules: int
    conv_modules: int
    cp_modules: int
    ranks: dict[int, int]
    alphas: dict[float, int]
    dtypes: dict[str, int]
    tensors: int
    parameters: int
    hashes: dict[str, str]
    metadata: dict[str, str]
    embeddings: list[str] = field(default_factory=list)
    damaged: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)  # modules per kind: lora, loha, lokr, full, norm, dora
    module_kinds: dict[str, str] = field(default_factory=dict)  # each module's kind, by internal key
    # The ΔW fingerprint (loralib.fingerprint.Fingerprint) when asked for, else None; why there is none.
    fingerprint: Any = field(default=None, repr=False)
    fingerprint_note: str | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dictionary (metadata values that hold JSON are left as strings)."""
        fingerprint, self.fingerprint = self.fingerprint, None
        try:
            data = asdict(self)
        finally:
            self.fingerprint = fingerprint
        data.pop("fingerprint")
        data.pop("fingerprint_note")
        data["ranks"] = {str(k): v for k, v in self.ranks.items()}
        data["alphas"] = {format_number(k): v for k, v in self.alphas.items()}
        return data


def format_number(value: float | int | str) -> str:
    """A rank, alpha or weight for people to read: ``8``, ``0.75``, ``1e-05`` (not ``8.0``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else f"{value:g}"
    return str(value)


def _metadata_claim(metadata: dict[str, str]) -> str | None:
    claims = [metadata[k] for k in ("ss_base_model_version", "modelspec.architecture") if metadata.get(k)]
    return ", ".join(claims) or None


def _claim_conflicts(claim: str | None, architecture: str) -> bool:
    if not claim or architecture == UNKNOWN:
        return False
    says = claimed_architecture({"modelspec.architecture": claim})
    if says is None or says == architecture:
        return False
    return not (says == "sd3" and architecture.startswith("sd3"))  # "SD3" claims fit every SD3 variant


def _foreign_modules(inputs: Inputs) -> tuple[dict[str, int], str, str]:
    """Module count per component and the architecture of a non-plain kohya-named adapter."""
    source = inputs.sources[0]
    groups: dict[str, list[str]] = {}
    for name in source.names:
        if match := _KOHYA_MODULE.match(name):
            groups.setdefault(match.group(1), []).append(name)
    family = name_family(source.names) or SD
    layout = UNetLayout.from_config(SDXL.unet_config) if family == SD else None
    widths, components = {}, Counter()
    for module in groups:
        target = resolve_module_name(module, layout, family=family)
        if target is None:
            continue
        width = _lycoris_in_features(source.shapes, module)
        for key in target.keys:
            components[key.split(".", 1)[0]] += 1
            if width:
                widths[key] = width
    detection = detect_architecture(widths, source.metadata, None if family == SD else family)
    return dict(components), detection.name, detection.evidence


def _lycoris_in_features(shapes: dict[str, tuple[int, ...]], module: str) -> int | None:
    """Input width of a module of a kind lorareg does not read, where its factors tell it."""
    shape = shapes.get(f"{module}.lora_down.weight")
    return shape[1] if shape else None


def inspect(path: str | Path, *, hashes: bool = True, fingerprint: bool = False) -> InspectReport:
    """Describe the adapter at ``path`` without loading its tensors.

    ``hashes`` hashes every file of the adapter (``hashes`` holds the main file's, and the
    adapter's ``identity``); ``fingerprint`` also computes the ΔW fingerprint of a plain LoRA, from
    the same read of the bytes. Raises :class:`~loralib.errors.NotALoraError` for files that are
    not adapters and :class:`~loralib.errors.CorruptFileError` for unreadable ones. Truncated files
    are described with ``damaged=True``.
    """
    try:
        inputs = open_inputs(path, allow_pickle=False)
    except UnsafeFileError as exc:
        raise UnsafeFileError(f"{Path(path).name} is a pickle file, and inspect never unpickles files (that would run "
                              "code stored in them)",
                              "If you trust its source, `lorareg convert FILE --allow-pickle` writes a .safetensors "
                              "copy that inspect can read") from exc
    kind: Kind = identify_inputs(inputs)
    if not kind.is_adapter:
        refuse(kind, inputs.path.name)
    sources = inputs.sources
    problems = [s.header.problem for s in sources if s.header is not None and s.header.problem]
    metadata: dict[str, str] = {}
    for s in sources:
        metadata.update(s.metadata)
    dtypes = Counter(d for s in sources for d in s.dtypes.values())
    parameters = sum(_numel(shape) for s in sources for shape in s.shapes.values())
    claim = _metadata_claim(metadata)
    notes: list[str] = []
    embeddings: list[str] = []
    kinds: dict[str, int] = {}
    module_kinds: dict[str, str] = {}
    index = None
    if for_kind(kind) is not None:
        index = index_inputs(inputs, kind)
        kind = index.kind
        entries = list(index.modules.values())
        kinds = dict(index.kind_counts().most_common())
        module_kinds = {e.key: e.kind for e in entries}
        detection = index.architecture
        architecture, evidence = detection.name, detection.evidence
        counts = Counter(e.key.split(".", 1)[0] for e in entries)
        components = {c: counts[c] for c in COMPONENTS if c in counts}
        ranks = dict(sorted(index.rank_counts().items()))
        alphas = dict(sorted(index.alpha_counts().items()))
        conv = sum(e.is_conv for e in entries)
        cp = sum(e.mid is not None for e in entries)
        modules = len(entries)
        embeddings = list(index.embeddings)
        notes += index.notes
        notes += _kind_notes(kinds)
    else:
        components, architecture, evidence = _foreign_modules(inputs)
        modules = sum(components.values())
        ranks, alphas, conv, cp = {}, {}, 0, 0
        notes.append(f"{kind.title} is recognised, but lorareg cannot apply or convert it")
    if _claim_conflicts(claim, architecture):
        notes.append(f"the file's metadata claims {claim}, but its tensors say {architecture}; lorareg trusts the tensors")
    file_hashes, print_, print_note = {}, None, None
    if hashes or fingerprint:
        file_hashes, print_, print_note = _read_bytes(sources, index, hashes=hashes,
                                                      fingerprint=fingerprint, kind=kind)
    return InspectReport(
        path=str(inputs.path), files=[str(s.path) for s in sources],
        file_size=sum(s.path.stat().st_size for s in sources), format=kind.format, format_title=kind.title,
        plain_lora=kind.plain_lora, architecture=architecture, architecture_evidence=evidence,
        metadata_claims=claim, modules=modules, components=components, linear_modules=modules - conv,
        conv_modules=conv, cp_modules=cp, ranks=ranks, alphas=alphas, dtypes=dict(dtypes),
        tensors=sum(len(s.names) for s in sources), parameters=parameters, hashes=file_hashes,
        metadata=metadata, embeddings=embeddings, damaged=bool(problems), problems=problems, notes=notes,
        kinds=kinds, module_kinds=module_kinds, fingerprint=print_, fingerprint_note=print_note)


def _kind_notes(kinds: dict[str, int]) -> list[str]:
    """What a user should know about modules that are not plain LoRA."""
    notes = []
    other = {k: n for k, n in kinds.items() if k != "lora"}
    if other:
        named = ", ".join(f"{KIND_TITLES[k]} {n}" for k, n in other.items())
        notes.append(f"{sum(other.values())} module(s) are not plain LoRA ({named}); `lorareg convert FILE --rank N` "
                     "(or --plain) makes a plain LoRA of them")
    if "dora" in kinds:
        notes.append("DoRA's ΔW depends on the base model's weights: operations that need it take --base MODEL")
    return notes


def _read_bytes(sources: list[TensorSource], index: AdapterIndex | None, *, hashes: bool, fingerprint: bool,
                kind: Kind) -> tuple[dict[str, str], Any, str | None]:
    """Hash every file and fingerprint the factors, reading each file once through a memory map.

    Returns the main file's hashes (with the adapter's identity), the fingerprint and, when there
    is none, why.
    """
    from .fingerprint import fingerprint as compute

    files = [s for s in sources if s.header is not None]
    if not files:
        return {}, None, "its tensors are not in a safetensors file"
    with ExitStack() as stack:
        maps = {id(source): _file_bytes(stack, source.header) for source in files}
        found: dict[str, str] = {}
        if hashes:
            per_file = []
            for source in files:
                with memoryview(maps[id(source)]) as view:
                    per_file.append(hash_mapped(view, source.header))
            found = per_file[0].to_dict()
            if len(files) > 1:
                root = os.path.commonpath([str(s.path) for s in files])
                found["identity"] = folder_identity(
                    (Path(s.path).relative_to(root).as_posix(), h.identity) for s, h in zip(files, per_file))
        if not fingerprint:
            return found, None, None
        if index is None:
            return found, None, f"not a plain LoRA ({kind.title})"

        def read(source: TensorSource, name: str) -> bytes:
            info = source.header.tensors[name]
            start = source.header.data_start + info.begin
            data = maps[id(source)][start:start + info.nbytes]
            if isinstance(maps[id(source)], mmap.mmap):  # a large file: keep only what is in use in memory
                drop_pages(maps[id(source)], start, info.nbytes)
            return data

        try:
            result = compute(index, read)
        except Exception as exc:  # a fingerprint is extra: an odd file must still be described and hashed
            return found, None, f"it could not be fingerprinted ({type(exc).__name__}: {exc})"
    if result.modules == 0:
        reasons = sorted(set(result.skipped.values()))
        return found, None, "no module could be read (" + "; ".join(reasons[:3]) + ")" if reasons else "no modules"
    return found, result, None


READ_WHOLE = 32 * 2**20  # smaller files are read in one call; larger ones are memory-mapped


def _file_bytes(stack: ExitStack, header: SafetensorsHeader) -> bytes | mmap.mmap:
    """A file's bytes to hash and slice: those read with its header when small, read at once when
    not too large, memory-mapped (closed with ``stack``) when large."""
    if header.content is not None:
        return header.content
    with open(header.path, "rb", buffering=0) as handle:
        if header.file_size <= READ_WHOLE:
            return handle.read()
        return stack.enter_context(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def format_title(name: str) -> str:
    """A readable name for a format or adapter kind id (``lycoris-lokr`` → ``LyCORIS LoKr``)."""
    from .formats.table import FORMATS

    titles = {kind.format: kind.title for fmt in reversed(FORMATS) for kind in reversed(fmt.kinds)}
    return titles.get(name, name)


def architecture_title(name: str) -> str:
    """A readable name for an architecture id."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name].title
    return "unknown"


def metadata_summary(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata entries worth showing first (training settings, title, trigger phrase, top tags)."""
    keys = ("modelspec.title", "ss_output_name", "modelspec.trigger_phrase", "ss_sd_model_name", "ss_network_module",
            "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_learning_rate", "ss_num_epochs", "ss_steps",
            "ss_resolution", "ss_num_train_images", "modelspec.date", "ss_training_started_at")
    summary = {k: metadata[k] for k in keys if metadata.get(k)}
    tags = caption_tags(metadata)
    if tags:
        summary["top tags"] = ", ".join(tags)
    return summary


TAG_MAX_WORDS = 4
TAG_MAX_CHARACTERS = 48


def is_tag(text: str) -> bool:
    """True for a caption tag (``pxl style``, ``long blonde hair``), False for a whole sentence.

    kohya counts every comma-separated piece of every caption; in captioned (not tagged) datasets
    the pieces are sentences (``a red circle on a light background``), which are no trigger words.
    A tag has at most four words and 48 characters and does not end a sentence.
    """
    text = text.strip()
    return bool(text) and len(text.split()) <= TAG_MAX_WORDS and len(text) <= TAG_MAX_CHARACTERS \
        and not text.endswith((".", "!", "?"))


def caption_tags(metadata: dict[str, str], limit: int = 10) -> list[str]:
    """The most frequent caption tags of ``ss_tag_frequency`` that read as tags, not sentences (:func:`is_tag`)."""
    return [tag for tag, _ in tag_frequency(metadata) if is_tag(tag)][:limit]


def top_tags(metadata: dict[str, str], limit: int | None = 10) -> list[str]:
    """The most frequent pieces of the captions, from kohya's ``ss_tag_frequency`` (``limit=None``: all)."""
    return [tag for tag, _ in tag_frequency(metadata, limit)]


def tag_frequency(metadata: dict[str, str], limit: int | None = None) -> list[tuple[str, int]]:
    """Caption tags and how often they occur in the training captions (kohya's ``ss_tag_frequency``,
    summed over the dataset folders), most frequent first. Counts that are not finite numbers are
    ignored; an entry that is not JSON, or too large, gives no tags."""
    return list(_ranked_tags(metadata.get("ss_tag_frequency") or "", limit))


@functools.lru_cache(maxsize=8)
def _ranked_tags(text: str, limit: int | None) -> tuple[tuple[str, int], ...]:
    """The ``limit`` most frequent tags of one ``ss_tag_frequency`` value (cached: the catalog asks
    several times per file)."""
    frequency = loads_metadata(text, {})
    counts: dict[str, int] = {}
    for folder in frequency.values() if isinstance(frequency, dict) else ():
        if isinstance(folder, dict):
            for tag, count in folder.items():
                if type(count) is int or (type(count) is float and math.isfinite(count)):
                    tag = str(tag).strip()
                    counts[tag] = counts.get(tag, 0) + int(count)
    if limit is None:
        return tuple(sorted(counts.items(), key=operator.itemgetter(1), reverse=True))
    return tuple(heapq.nlargest(limit, counts.items(), key=operator.itemgetter(1)))


# Training metadata that is bulky JSON or a hash rather than a setting.
_NOT_SETTINGS = {"ss_tag_frequency", "ss_bucket_info", "ss_datasets", "ss_dataset_dirs", "ss_reg_dataset_dirs",
                 "ss_sd_scripts_commit_hash", "ss_new_sd_model_hash", "ss_sd_model_hash", "ss_new_vae_hash",
                 "ss_vae_hash"}


def training_settings(metadata: dict[str, str]) -> dict[str, str]:
    """The training settings kohya's sd-scripts wrote (``ss_*`` keys, without the prefix), in key order;
    caption and bucket statistics and hashes are left out."""
    return {key[3:]: value for key, value in sorted(metadata.items())
            if key.startswith("ss_") and key not in _NOT_SETTINGS}
