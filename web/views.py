"""What the pages show of catalog entries, gathered from the registry (no queries of its own)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loralib.inspection import architecture_title, format_number, tag_frequency, training_settings
from lorareg.registry.catalog import Catalog
from lorareg.registry.lineage import lineage
from lorareg.registry.records import Entry
from lorareg.registry.samples import png_text

from .graph import layout
from .media import card_image

HASH_LABELS = (("autov2", "AutoV2"), ("autov3", "AutoV3 (tensor SHA-256)"), ("a1111", "A1111"),
               ("sha256", "SHA-256"), ("legacy", "legacy"))
CLOUD_TAGS = 80


def prompt_name(entry: Entry, paths: list[str]) -> str:
    """The name A1111 and Forge use in ``<lora:NAME:weight>``: the file's stem (the catalog name without a file)."""
    for path in paths:
        candidate = Path(path)
        if candidate.suffix == ".safetensors" and candidate.name != "adapter_model.safetensors":
            return candidate.stem
    return entry.name


def card(entry: Entry, samples: list[dict], paths: list[str]) -> dict[str, Any]:
    """One grid card."""
    name = prompt_name(entry, paths)
    return {"id": entry.id, "name": entry.name, "title": entry.title if entry.title != entry.name else None,
            "architecture": entry.architecture or "?", "format": entry.format or "?", "rank": entry.rank_text,
            "tags": entry.tags, "triggers": entry.triggers[:6], "image": card_image(entry.id, samples, paths),
            "lora": f"<lora:{name}:0.8>", "damaged": entry.damaged}


def cards(catalog: Catalog, entries: list[Entry]) -> list[dict[str, Any]]:
    """Grid cards for a page of entries (two queries for all of them)."""
    samples, paths = catalog.samples_of(entries), catalog.paths_of(entries)
    return [card(e, samples.get(e.id, []), paths.get(e.id, [])) for e in entries]


def cloud(metadata: dict[str, str]) -> list[dict[str, Any]]:
    """The caption tags for a tag cloud: text, count and a size step 1–5 (log scale)."""
    tags = tag_frequency(metadata, CLOUD_TAGS)
    if not tags:
        return []
    top = math.log(tags[0][1] + 1)
    return [{"tag": t, "count": n, "size": 1 + round(4 * math.log(n + 1) / top) if top else 1}
            for t, n in sorted(tags, key=lambda item: item[0].casefold())]


def _parameters_text(sample: dict) -> str | None:
    """A sample's recorded settings as A1111 writes them (``Steps: 20, Sampler: Euler a, Seed: 7, …``)."""
    settings = sample.get("parameters")
    if not isinstance(settings, dict) and sample.get("seed") is None:
        return None
    fields = dict(settings) if isinstance(settings, dict) else {}
    if sample.get("seed") is not None:
        fields = {**{k: v for k, v in fields.items() if k in ("Steps", "Sampler", "CFG scale")},
                  "Seed": sample["seed"], **{k: v for k, v in fields.items() if k not in ("Steps", "Sampler", "CFG scale")}}
    return ", ".join(f"{k}: {v}" for k, v in fields.items())


def sample_views(entry: Entry) -> list[dict[str, Any]]:
    """The entry's samples: image URL, prompt, and every other recorded field (seed, parameters…)."""
    views = []
    for index, sample in enumerate(entry.samples):
        if not isinstance(sample, dict):
            continue
        path = str(sample.get("path") or "")
        details = {k: v for k, v in sample.items()
                   if k not in ("path", "prompt", "seed", "parameters") and v not in (None, "", [], {})}
        parameters = _parameters_text(sample)
        if parameters is None and path.endswith(".png") and Path(path).is_file():
            text = png_text(path).get("parameters", "")
            parameters = text.split("\n", 1)[1].strip() if "\n" in text else None
        if parameters:
            details["parameters"] = parameters
        views.append({"url": f"/media/{entry.id}/sample/{index}", "prompt": sample.get("prompt"),
                      "details": {k: v if isinstance(v, str) else str(v) for k, v in details.items()},
                      "file": Path(path).name})
    return views


def detail(catalog: Catalog, entry: Entry) -> dict[str, Any]:
    """Everything the detail page shows."""
    files = catalog.files(entry)
    paths = [f.path for f in files]
    tree = lineage(catalog, entry)
    hashes = entry.hashes
    return {
        "entry": entry,
        "arch_title": architecture_title(entry.architecture or "unknown"),
        "hashes": [(label, hashes[key]) for key, label in HASH_LABELS if key in hashes],
        "lora": f"<lora:{prompt_name(entry, paths)}:0.8>",
        "files": files,
        "children": catalog.children(entry),
        "parents": catalog.parents(entry),
        "graph": layout(tree) if tree.parents else None,
        "same": [other for other, _ in catalog.same_adapter(entry)],
        "settings": training_settings(entry.metadata),
        "cloud": cloud(entry.metadata),
        "samples": sample_views(entry),
        "ranks": ", ".join(f"{k} ×{v}" for k, v in entry.ranks.items()) or "—",
        "alphas": ", ".join(f"{k} ×{v}" for k, v in entry.alphas.items()) or "—",
        "components": ", ".join(f"{k} {v}" for k, v in entry.components.items()),
        "operation": entry.operation_name,
        "image": card_image(entry.id, [s for s in entry.samples if isinstance(s, dict)], paths),
    }


def compare_rows(entries: list[Entry]) -> list[dict[str, Any]]:
    """The rows of the side-by-side table: a label, one value per entry, and whether they differ."""
    def row(label: str, values: list[Any]) -> dict[str, Any]:
        texts = ["—" if v in (None, "", [], {}) else str(v) for v in values]
        return {"label": label, "cells": texts, "differs": len(set(texts)) > 1}

    rows = [row("architecture", [architecture_title(e.architecture or "unknown") for e in entries]),
            row("format", [e.format for e in entries]),
            row("rank", [e.rank_text for e in entries]),
            row("modules", [e.modules for e in entries]),
            row("alphas", [", ".join(f"{k} ×{v}" for k, v in e.alphas.items()) for e in entries]),
            row("dtype", [e.dtype for e in entries]),
            row("parameters", [format_number(e.parameters) if e.parameters else None for e in entries]),
            row("tags", [", ".join(e.tags) for e in entries]),
            row("trigger words", [", ".join(e.triggers) for e in entries]),
            row("A1111 hash", [e.hashes["a1111"] for e in entries]),
            row("made by", [e.operation_name for e in entries])]
    settings = [training_settings(e.metadata) for e in entries]
    keys = sorted({k for s in settings for k in s})
    rows += [row(key, [s.get(key) for s in settings]) for key in keys]
    return rows
