"""Describe an adapter file from its header alone: ``loralib.inspect(path)``.

No tensor is loaded (a few scalar alphas are read straight from the file), so this is fast on
any file and works on damaged ones, which are described and flagged.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .architectures import ARCHITECTURES, COMPONENTS, SD, SDXL, UNKNOWN, claimed_architecture, detect_architecture
from .files.hashes import hash_file
from .formats import Inputs, identify_inputs, index_inputs, open_inputs, refuse
from .formats.detect import Kind
from .naming.kohya import family_of_names, resolve_module_name
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

    def to_dict(self) -> dict:
        """A JSON-ready dictionary (metadata values that hold JSON are left as strings)."""
        data = asdict(self)
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
    family = family_of_names(list(groups)) or SD
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
    """Input width of a LoHa/LoKr/DoRA module from its factor shapes."""
    get = shapes.get
    if shape := get(f"{module}.lora_down.weight") or get(f"{module}.hada_w1_b"):
        return shape[1]
    w1 = get(f"{module}.lokr_w1") or get(f"{module}.lokr_w1_b")
    w2 = get(f"{module}.lokr_w2") or get(f"{module}.lokr_w2_b")
    if w1 and w2 and len(w1) == 2 and len(w2) == 2:
        return w1[-1] * w2[-1]
    return None


def inspect(path: str | Path, *, hashes: bool = True) -> InspectReport:
    """Describe the adapter at ``path`` without loading its tensors.

    Raises :class:`~loralib.errors.NotALoraError` for files that are not adapters and
    :class:`~loralib.errors.CorruptFileError` for unreadable ones. Truncated files are described
    with ``damaged=True``.
    """
    inputs = open_inputs(path, allow_pickle=False)
    kind: Kind = identify_inputs(inputs)
    if not kind.is_adapter:
        refuse(kind, inputs.path.name)
    sources = inputs.sources
    problems = [f"{s.path.name} is truncated: {s.header.missing_bytes} bytes of tensor data are missing"
                for s in sources if s.is_truncated]
    metadata: dict[str, str] = {}
    for s in sources:
        metadata.update(s.metadata)
    dtypes = Counter(d for s in sources for d in s.dtypes.values())
    parameters = sum(_numel(shape) for s in sources for shape in s.shapes.values())
    claim = _metadata_claim(metadata)
    notes: list[str] = []
    embeddings: list[str] = []
    if kind.plain_lora:
        index = index_inputs(inputs, kind)
        entries = list(index.modules.values())
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
    else:
        components, architecture, evidence = _foreign_modules(inputs)
        modules = sum(components.values())
        ranks, alphas, conv, cp = {}, {}, 0, 0
        notes.append(f"{kind.title} is recognised but not a plain LoRA: convert, merge and resize need plain LoRA factors")
    if _claim_conflicts(claim, architecture):
        notes.append(f"the file's metadata claims {claim}, but its tensors say {architecture}; lorareg trusts the tensors")
    file_hashes = {}
    if hashes:
        main = sources[0]
        file_hashes = hash_file(main.path, main.header.data_start).to_dict() if main.header else {}
    return InspectReport(
        path=str(inputs.path), files=[str(s.path) for s in sources],
        file_size=sum(s.path.stat().st_size for s in sources), format=kind.format, format_title=kind.title,
        plain_lora=kind.plain_lora, architecture=architecture, architecture_evidence=evidence,
        metadata_claims=claim, modules=modules, components=components, linear_modules=modules - conv,
        conv_modules=conv, cp_modules=cp, ranks=ranks, alphas=alphas, dtypes=dict(dtypes),
        tensors=sum(len(s.names) for s in sources), parameters=parameters, hashes=file_hashes,
        metadata=metadata, embeddings=embeddings, damaged=bool(problems), problems=problems, notes=notes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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
    tags = top_tags(metadata)
    if tags:
        summary["top tags"] = ", ".join(tags)
    return summary


def top_tags(metadata: dict[str, str], limit: int = 10) -> list[str]:
    """The most frequent caption tags from kohya's ``ss_tag_frequency``."""
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return []
    counts: Counter = Counter()
    for folder in frequency.values() if isinstance(frequency, dict) else ():
        if isinstance(folder, dict):
            counts.update({str(k).strip(): int(v) for k, v in folder.items() if isinstance(v, (int, float))})
    return [tag for tag, _ in counts.most_common(limit)]
