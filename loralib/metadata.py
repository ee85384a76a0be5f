"""The metadata lorareg writes: kohya's ``ss_*``, Stability's ``modelspec.*`` and its own history.

Input metadata is kept; what an operation changed is updated (rank, alpha, architecture), the
hashes are computed on the bytes actually written, and every operation is appended to
``lorareg.history`` — a JSON list of records with the operation, its inputs (file name, identity,
tensor hash and file hash) and its parameters — which the catalog reads to show lineage.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .architectures import ARCHITECTURES
from .jsontext import loads_metadata
from .records import InputRecord, OperationRecord
from .version import TOOL

if TYPE_CHECKING:
    from .adapter import LoraAdapter
    from .files.hashes import Deferred

HISTORY_KEY = "lorareg.history"
# Hashes that describe the file they are stored in; stale once anything is rewritten.
SELF_HASHES = {"sshs_model_hash": "tensor_sha256", "sshs_legacy_hash": "legacy",
               "modelspec.hash_sha256": "tensor_sha256_0x"}


def _lycoris_algorithm(adapter: LoraAdapter) -> tuple[str, bool] | None:
    """LyCORIS' ``algo`` for an adapter with non-plain modules (its most common kind) and whether it
    uses DoRA; None for a plain LoRA."""
    kinds = Counter(getattr(m, "inner_kind", m.kind) for m in adapter.modules.values())
    dora = any(m.kind == "dora" for m in adapter.modules.values())
    special = [k for k, _ in kinds.most_common() if k != "lora"]
    if not special and not dora:
        return None
    names = {"loha": "loha", "lokr": "lokr", "full": "full", "norm": "full"}
    return (names[special[0]] if special else "locon"), dora


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def history(metadata: dict[str, str]) -> list[dict]:
    """The operation records stored in a file's metadata (oldest first)."""
    records = loads_metadata(metadata.get(HISTORY_KEY), [])
    return records if isinstance(records, list) else []


def input_record(adapter: LoraAdapter, weight: float | None = None) -> InputRecord:
    """How an operation's record names one input: file name and path, format, and its hashes
    (identity, tensor hash, file hash; filled in when the background hashing is done)."""
    path = adapter.source_path
    return InputRecord(file=path.name if path else None, format=adapter.source_format,
                       path=str(path.absolute()) if path else None, weight=weight,
                       pending_hashes=adapter.source_hash)


@dataclass
class FileMetadata:
    """The metadata a writer stores: its values, the placeholders in them for hashes still being
    computed (each with the value it stands for), and the operation record as written."""

    values: dict[str, str]
    pending: dict[str, Deferred] = field(default_factory=dict)
    operation: OperationRecord | None = None

    def completed_operation(self) -> OperationRecord | None:
        """The operation record with its pending hashes resolved (once the file is written)."""
        return self.operation.completed() if self.operation is not None else None


def build(adapter: LoraAdapter, *, title: str, operation: OperationRecord | None) -> FileMetadata:
    """The metadata to write for ``adapter`` (hash entries are filled in by the writer)."""
    meta = {k: v for k, v in adapter.metadata.items() if k not in SELF_HASHES}
    modules = [m for m in adapter.modules.values() if m.rank is not None]  # full/norm differences have no rank
    ranks = Counter(m.rank for m in modules)
    alphas = Counter(m.alpha for m in modules)
    # sd-scripts counts 1x1 convs (SD1's proj_in/proj_out) with the linear layers: conv_dim is for k×k LoCon
    conv = [m for m in modules if m.is_conv and m.kernel_size != (1, 1)]
    linear = [m for m in modules if not (m.is_conv and m.kernel_size != (1, 1))]
    main = linear or conv
    uniform_rank = len({m.rank for m in main}) == 1
    uniform_alpha = len({m.alpha for m in main}) == 1
    args = loads_metadata(meta.get("ss_network_args"), {})
    args = args if isinstance(args, dict) else {}
    algorithm = _lycoris_algorithm(adapter)
    meta["ss_network_module"] = "lycoris.kohya" if algorithm else "networks.lora"
    meta["ss_network_dim"] = str(main[0].rank) if main and uniform_rank else "Dynamic"
    meta["ss_network_alpha"] = _number(main[0].alpha) if main and uniform_alpha else "Dynamic"
    stale = [args.pop(k) for k in ("algo", "dora_wd", "wd_on_output") if k in args]  # an input's LyCORIS settings
    if algorithm:
        args.update(algo=algorithm[0], **({"dora_wd": "True"} if algorithm[1] else {}))
    if conv and linear and len({m.rank for m in conv}) == 1 and len({m.alpha for m in conv}) == 1:
        args.update(conv_dim=str(conv[0].rank), conv_alpha=_number(conv[0].alpha))
    if (conv and linear) or algorithm or stale:
        meta["ss_network_args"] = json.dumps(args)
    arch = ARCHITECTURES.get(adapter.architecture)
    if arch is not None:
        meta["ss_base_model_version"] = arch.ss_base_model_version
        meta["ss_v2"] = str(arch.name == "sd2")
        # Flux.1 dev and schnell adapters have the same modules: an input's own claim of one is kept
        if meta.get("modelspec.architecture") not in arch.modelspec_variants:
            meta["modelspec.architecture"] = arch.modelspec_architecture
        meta["modelspec.implementation"] = arch.modelspec_implementation
        meta.setdefault("modelspec.resolution", f"{arch.resolution}x{arch.resolution}")
    meta["modelspec.sai_model_spec"] = "1.0.0"
    if operation is None or operation.operation == "convert":
        meta.setdefault("modelspec.title", title)  # the same adapter keeps its title
    else:
        meta["modelspec.title"] = title  # a new adapter is named after its file
    meta["modelspec.date"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    meta["ss_output_name"] = title
    if operation is None:
        return FileMetadata(meta)
    written = {"tool": TOOL, "date": meta["modelspec.date"], "ranks": dict(sorted(ranks.items())),
               "alphas": {_number(a): n for a, n in sorted(alphas.items())}}
    entry, pending = operation.history_entry(written)
    meta[HISTORY_KEY] = json.dumps(history(adapter.metadata) + [entry])
    return FileMetadata(meta, pending, OperationRecord(operation.operation, operation.inputs, operation.params, written))
