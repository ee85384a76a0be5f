"""``lorareg export-site``: a static gallery of the catalog that opens from disk with no server.

The folder holds ``index.html`` (every card, filtered in the page by a small script over the
cards themselves, so no file has to be fetched: browsers refuse ``fetch`` on ``file://``),
``a/<id>.html`` (one page per adapter), ``images/`` (copies of the sample and preview images
that pass the same checks as the playground's), ``static/`` (style and script) and
``index.json`` (the entries' summaries, hashes and image paths, for programs). Pages are
rendered by the same autoescaping templates as the playground; links are all relative.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralib import __version__
from loralib.files.atomic import atomic_dir, refuse_overwrite
from lorareg.registry.catalog import Catalog
from lorareg.registry.records import Entry

from . import media, views
from .app import HERE, template_environment

STATIC_FILES = ("app.css", "gallery.js")


@dataclass
class SiteReport:
    """What :func:`export_site` wrote."""

    folder: Path
    entries: int
    images: int
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return {"folder": str(self.folder), "entries": self.entries, "images": self.images, "files": self.files}


def select(catalog: Catalog, tags: tuple[str, ...] | list[str] = (), architecture: str | None = None) -> list[Entry]:
    """The entries of the gallery (full records): all, or those with any of ``tags``, of ``architecture``."""
    chosen: dict[int, Entry] = {}
    for tag in tags or [None]:
        for entry in catalog.list(tag=tag, architecture=architecture, limit=None):
            chosen.setdefault(entry.id, entry)
    full = (catalog.by_id(i) for i in chosen)
    return sorted((e for e in full if e is not None), key=lambda e: e.name.casefold())


def _copy_image(source: str | None, images: Path, stem: str) -> str | None:
    """Copy an image that passes the playground's checks; return its path relative to the site root."""
    found = media.read_image(source) if source else None
    if found is None:
        return None
    data, kind = found
    name = f"{stem}.{kind.split('/')[1].replace('jpeg', 'jpg')}"
    (images / name).write_bytes(data)
    return f"images/{name}"


def _entry_images(entry: Entry, paths: list[str], images: Path) -> tuple[list[dict], str | None]:
    """Copy an entry's samples and preview; return the sample views (with site-relative URLs) and the card image."""
    stem = entry.tensor_sha256[:16]
    samples = []
    for view, index in zip(views.sample_views(entry), range(len(entry.samples)), strict=False):
        copied = _copy_image(media.sample_path(entry, index), images, f"{stem}-{index}")
        if copied:
            samples.append({**view, "url": copied})
    preview = None if samples else _copy_image(media.preview_of(paths), images, f"{stem}-preview")
    return samples, samples[0]["url"] if samples else preview


def export_site(home: str | os.PathLike | None, folder: str | os.PathLike, *, tags: tuple[str, ...] | list[str] = (),
                architecture: str | None = None, title: str | None = None, force: bool = False,
                progress: Callable[[int, int], None] | None = None) -> SiteReport:
    """Write the gallery of the catalog at ``home`` (or of a selection) into ``folder``, atomically per file.

    ``progress(done, total)`` is called after each adapter's page.
    """
    target = Path(folder).expanduser()
    refuse_overwrite(target, force)
    env = template_environment()
    title = " ".join((title or "LoRA gallery").split())
    written_images = 0
    with Catalog(home) as catalog, atomic_dir(target) as tmp:
        entries = select(catalog, tags, architecture)
        all_paths = catalog.paths_of(entries)
        (tmp / "a").mkdir()
        (tmp / "images").mkdir()
        (tmp / "static").mkdir()
        cards, index = [], []
        exported = {e.id for e in entries}
        by_hash = {e.tensor_sha256: e.id for e in entries}
        links = {"entry_link": lambda i: f"{i}.html" if i in exported else "",
                 "hash_link": lambda h: f"{by_hash[h]}.html" if h in by_hash else ""}
        for done, entry in enumerate(entries, 1):
            paths = all_paths.get(entry.id, [])
            samples, image = _entry_images(entry, paths, tmp / "images")
            written_images += len(samples) + (1 if image and not samples else 0)
            card = {**views.card(entry, [], paths), "image": image, "href": f"a/{entry.id}.html",
                    "search": " ".join([entry.name, entry.title or "", *entry.tags, *entry.triggers]).casefold()}
            cards.append(card)
            context = views.detail(catalog, entry)
            context.update(samples=samples, image=image)
            page = env.get_template("site/detail.html").render(site_title=title, root="../", version=__version__,
                                                               **links, **context)
            (tmp / "a" / f"{entry.id}.html").write_text(page, encoding="utf-8")
            index.append({**entry.summary(), "page": card["href"], "image": image,
                          "samples": [{"image": s["url"], "prompt": s["prompt"], **s["details"]} for s in samples]})
            if progress:
                progress(done, len(entries))
        facets = {"architecture": sorted({c["architecture"] for c in cards}),
                  "tag": sorted({t for c in cards for t in c["tags"]})}
        html = env.get_template("site/index.html").render(site_title=title, cards=cards, facets=facets, root="",
                                                          version=__version__)
        (tmp / "index.html").write_text(html, encoding="utf-8")
        (tmp / "index.json").write_text(json.dumps({"title": title, "generator": f"lorareg {__version__}",
                                                    "adapters": index}, indent=1, ensure_ascii=False, default=str),
                                        encoding="utf-8")
        for name in STATIC_FILES:
            (tmp / "static" / name).write_bytes((HERE / "static" / name).read_bytes())
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    return SiteReport(target, len(entries), written_images, files)
