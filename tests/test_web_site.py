"""``lorareg export-site`` (a static gallery that opens from disk) and ``lorareg push-site`` (a static Space).

The gallery is checked against the files on disk (every link and image resolves inside the
folder, images are byte copies) and the catalog; push-site against the in-repo Hub server.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lorareg.registry.catalog import Catalog

ALICE = "hf_alice_site_token"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)


def local_links(page: Path) -> list[str]:
    parser = _Links()
    parser.feed(page.read_text())
    return [link for link in parser.links if not link.startswith(("data:", "http://", "https://", "#"))]


def test_export_site_writes_pages_images_and_an_index_that_work_from_disk(lorareg, demo_catalog, tmp_path):
    site = tmp_path / "gallery"
    done = lorareg("--home", demo_catalog.home, "export-site", site, "--title", "My <LoRAs>", "--json")
    assert done.code == 0, done.err
    report = json.loads(done.out)
    assert report["entries"] == 6 and report["images"] == 5  # 4 samples, 1 preview
    index = json.loads((site / "index.json").read_text())
    with Catalog(demo_catalog.home) as catalog:
        entries = {e.name: e for e in catalog.list(limit=None)}
    assert {a["name"] for a in index["adapters"]} == set(entries)
    for adapter in index["adapters"]:
        assert adapter["hashes"] == entries[adapter["name"]].hashes
        assert (site / adapter["page"]).is_file()
    pixel = next(a for a in index["adapters"] if a["name"] == "pixel-art")
    assert [s["prompt"] for s in pixel["samples"]] == ["pxl style, a castle on a hill, 0", "pxl style, a castle on a hill, 1"]
    for sample, original in zip(pixel["samples"], ("pixel-art-0.png", "pixel-art-1.png"), strict=True):
        assert (site / sample["image"]).read_bytes() == (demo_catalog.files / "samples" / original).read_bytes()
    cyber = next(a for a in index["adapters"] if a["name"] == "cyber-city")
    assert (site / cyber["image"]).read_bytes() == (demo_catalog.files / "cyber-city.preview.png").read_bytes()
    pages = [site / "index.html", *sorted((site / "a").glob("*.html"))]
    assert len(pages) == 7
    for page in pages:  # every relative link and image exists inside the folder
        for link in local_links(page):
            target = (page.parent / link.split("#")[0]).resolve()
            assert target.is_file() and target.is_relative_to(site.resolve()), (page.name, link)
    html = (site / "index.html").read_text()
    assert "My &lt;LoRAs&gt;" in html and html.count('class="card"') == 6
    assert not list(site.glob("**/*.safetensors"))  # the gallery shows adapters; it does not ship them
    merged = (site / pixel["page"].replace(str(entries["pixel-art"].id), str(entries["pixel-watercolor"].id))).read_text()
    assert f'href="{entries["pixel-art"].id}.html"' in merged  # the lineage links to the parents' pages


def test_export_site_selects_by_tag_and_architecture_and_refuses_to_overwrite(lorareg, demo_catalog, tmp_path):
    site = tmp_path / "styles"
    assert lorareg("--home", demo_catalog.home, "export-site", site, "--tag", "painting", "--tag", "scene").code == 0
    names = {a["name"] for a in json.loads((site / "index.json").read_text())["adapters"]}
    assert names == {"watercolor", "cyber-city"}
    again = lorareg("--home", demo_catalog.home, "export-site", site)
    assert again.code == 1 and again.err.startswith("error: ") and "already exists" in again.err
    assert len(again.err.strip().splitlines()) == 1
    assert lorareg("--home", demo_catalog.home, "export-site", site, "--force", "--arch", "sdxl").code == 0
    assert json.loads((site / "index.json").read_text())["adapters"] == []


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    from tests.helpers.hub_server import HubServer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer(tokens={ALICE: "alice"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", ALICE)
        yield server
        assert server.server_errors == []


def test_push_site_publishes_the_gallery_as_a_static_space(lorareg, demo_catalog, hub, tmp_path):
    from huggingface_hub import RepoCard

    site = tmp_path / "gallery"
    assert lorareg("--home", demo_catalog.home, "export-site", site, "--tag", "style").code == 0
    done = lorareg("--home", demo_catalog.home, "push-site", "--space", "alice/gallery", "--from", site,
                   "--title", "Alice's styles", "--json")
    assert done.code == 0, done.err
    result = json.loads(done.out)
    space = "spaces/alice/gallery"
    assert hub.space_sdk(space) == "static" and result["commit"] == hub.head(space)
    exported = sorted(p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file())
    assert hub.list_files(space) == sorted([".gitattributes", "README.md", *exported])
    for name in exported:
        assert hub.file_bytes(space, name) == (site / name).read_bytes(), name
    card = RepoCard(hub.file_bytes(space, "README.md").decode()).data.to_dict()
    assert card["sdk"] == "static" and card["app_file"] == "index.html" and card["title"] == "Alice's styles"
    # without --from it exports the catalog (or the selection) itself first
    assert lorareg("--home", demo_catalog.home, "push-site", "--space", "alice/painting", "--tag", "painting").code == 0
    names = {a["name"] for a in json.loads(hub.file_bytes("spaces/alice/painting", "index.json"))["adapters"]}
    assert names == {"watercolor"}
    assert "painting" in RepoCard(hub.file_bytes("spaces/alice/painting", "README.md").decode()).data.to_dict()["tags"]
    assert re.search(r"<h2><a href=\"a/\d+\.html\">watercolor</a></h2>",
                     hub.file_bytes("spaces/alice/painting", "index.html").decode())


def test_push_site_errors_are_one_line(lorareg, demo_catalog, hub, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = lorareg("push-site", "--space", "alice/x", "--from", empty)
    assert res.code == 1 and "has no index.html" in res.err and len(res.err.strip().splitlines()) == 1
    site = tmp_path / "site"
    assert lorareg("--home", demo_catalog.home, "export-site", site).code == 0
    res = lorareg("push-site", "--space", "bob/x", "--from", site)
    assert res.code == 1 and "403" in res.err and ALICE not in res.err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = lorareg("push-site", "--space", "alice/x", "--from", site)
    assert res.code == 1 and "HF_HUB_OFFLINE" in res.err
