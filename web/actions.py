"""The playground's actions: the same library calls as ``lorareg merge``, ``resize``, ``convert``,
``generate`` and ``push``, with outputs recorded in the catalog the same way.

Each function runs inside a background job (:mod:`lorareg.web.jobs`) and returns what the job
page shows (the new entry's id and name, or the Hub URL). Outputs are written only inside the
server's output folder, under a plain file name the user chose; nothing is overwritten.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralib.errors import InputNotFoundError, InvalidArgumentError
from loralib.files.atomic import refuse_overwrite
from loralib.vocabulary import MERGE_METHODS
from loralib.vocabulary import WRITE_FORMATS as FORMATS
from lorareg.registry.catalog import Catalog
from lorareg.registry.outputs import record_output
from lorareg.registry.records import Entry

from .jobs import Job

_FILE_NAME = re.compile(r"^[\w][\w .+()\[\]-]{0,150}$")


@dataclass
class Settings:
    """What the server was started with: the catalog, where outputs go, the base model for previews."""

    home: str | None
    output_dir: Path
    base_model: str | None = None


def output_path(settings: Settings, name: str, fmt: str) -> Path:
    """Where an output named ``name`` is written: inside the output folder, never elsewhere.

    ``name`` is a plain file name (letters, digits, spaces, ``._-+()[]``; no folders); ``.safetensors``
    is added for single-file formats.
    """
    name = (name or "").strip()
    if not _FILE_NAME.match(name) or name in (".", "..") or ".." in name:
        raise InvalidArgumentError(f"{name!r} is not a usable output name",
                                   "Use a plain file name: letters, digits, spaces and . _ - + ( ) [ ]")
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"unknown format {fmt!r}", f"Choose one of {', '.join(FORMATS)}")
    if fmt == "peft":
        name = name.removesuffix(".safetensors")
    elif not name.endswith(".safetensors"):
        name += ".safetensors"
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    path = settings.output_dir / name
    refuse_overwrite(path)
    return path


def _entry(catalog: Catalog, entry_id: int) -> Entry:
    entry = catalog.by_id(entry_id)
    if entry is None:
        raise InputNotFoundError(f"there is no catalog entry {entry_id}", "It may have been removed; reload the page")
    return entry


def _recorded(result, settings: Settings, target: Path) -> dict[str, Any]:
    added = record_output(result, settings.home)
    return {"entry_id": added.entry.id, "name": added.entry.name, "path": str(target), "new": added.created}


def merge(job: Job, settings: Settings, inputs: list[tuple[int, float]], *, method: str = "concat",
          rank: int | None = None, density: float | None = None, seed: int = 0, fmt: str = "kohya",
          name: str = "") -> dict[str, Any]:
    """``lorareg merge``: weighted catalog entries -> one adapter in the output folder, registered."""
    from loralib.compose import merge as merge_adapters

    if len(inputs) < 1:
        raise InvalidArgumentError("choose at least one adapter to merge")
    if method not in MERGE_METHODS:
        raise InvalidArgumentError(f"unknown merge method {method!r}", f"Choose one of {', '.join(MERGE_METHODS)}")
    target = output_path(settings, name, fmt)
    with Catalog(settings.home) as catalog:
        paths = [(catalog.local_path(_entry(catalog, i)), float(w)) for i, w in inputs]
    job.checkpoint("loading and merging")
    composition = merge_adapters(paths, rank, method=method, density=density, seed=seed, progress=job.progress)
    job.checkpoint("writing")
    result = composition.save(target, fmt)
    return _recorded(result, settings, target)


def resize(job: Job, settings: Settings, entry_id: int, *, rank: int, fmt: str = "kohya",
           name: str = "") -> dict[str, Any]:
    """``lorareg resize``: the best rank-``rank`` approximation of an entry, registered."""
    from loralib.compose import resize as resize_adapter

    target = output_path(settings, name, fmt)
    with Catalog(settings.home) as catalog:
        source = catalog.local_path(_entry(catalog, entry_id))
    job.checkpoint("resizing")
    composition = resize_adapter(source, rank, progress=job.progress)
    job.checkpoint("writing")
    result = composition.save(target, fmt)
    return _recorded(result, settings, target)


def convert(job: Job, settings: Settings, entry_id: int, *, fmt: str, name: str = "") -> dict[str, Any]:
    """``lorareg convert``: the entry in another format (same ΔW), registered."""
    from loralib.formats import convert as convert_adapter

    target = output_path(settings, name, fmt)
    with Catalog(settings.home) as catalog:
        source = catalog.local_path(_entry(catalog, entry_id))
    job.checkpoint("converting")
    result = convert_adapter(source, target, fmt)
    job.progress(1, 1)
    return _recorded(result, settings, target)


def generate(job: Job, settings: Settings, entry_id: int, *, prompt: str, weight: float = 0.8, seed: int = 0,
             steps: int = 20, count: int = 1) -> dict[str, Any]:
    """``lorareg generate`` with the configured base model; the images become the entry's samples."""
    from loralib.generation import generate as render
    from lorareg.registry.outputs import attach_samples

    if not settings.base_model:
        raise InvalidArgumentError("no base model is configured for previews",
                                   "Start the server with: lorareg serve --base-model PATH")
    if not prompt.strip():
        raise InvalidArgumentError("the prompt is empty", "Describe the image to render")
    with Catalog(settings.home) as catalog:
        entry = _entry(catalog, entry_id)
        source = catalog.local_path(entry)
    folder = settings.output_dir / "samples" / (re.sub(r"[^\w.-]+", "_", entry.name, flags=re.ASCII).strip("._")
                                                or entry.tensor_sha256[:12])
    job.checkpoint("loading the base model")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    result = render(settings.base_model, prompt, [(source, weight)], names=[source.stem], output_dir=folder,
                    num_samples=count, seed=seed, steps=steps, progress=job.progress)
    images = [image.path for image in result.images]
    attach_samples(images, result.adapters, settings.home)  # as `lorareg generate` does: prompt, seed, weight
    return {"entry_id": entry.id, "name": entry.name, "images": [str(p) for p in images]}


def push(job: Job, settings: Settings, entry_id: int, *, repo_id: str, private: bool = False) -> dict[str, Any]:
    """``lorareg push``: upload the entry with a model card to a Hub repo."""
    from lorareg.registry.hub import push as push_adapter

    job.checkpoint("uploading")
    with Catalog(settings.home) as catalog:
        entry = _entry(catalog, entry_id)
        result = push_adapter(catalog, entry, repo_id.strip(), private=private)
    job.progress(1, 1)
    return {"entry_id": entry.id, "name": entry.name, "url": result.url, "repo": result.repo_id,
            "commit": result.commit}
