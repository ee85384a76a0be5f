"""The playground's pages over HTTP (Starlette's TestClient): grid, filters, detail, edit, compare, merge, images.

Expected values come from outside the web layer: hashlib for hashes, the demo collection's own
definition (tests/helpers/web_catalog.py) for names, tags, captions and samples, and the files on disk.
"""

from __future__ import annotations

import hashlib
import json
import re
from html import unescape

import pytest

from lorareg.registry.catalog import Catalog
from tests.helpers.web_catalog import STYLES
from tests.helpers.web_client import web_client


@pytest.fixture
def web(demo_catalog, tmp_path):
    with web_client(demo_catalog.home, tmp_path / "out") as client:
        client.demo = demo_catalog
        yield client


def card_names(html: str) -> list[str]:
    return [unescape(n) for n in re.findall(r'<h2><a href="/a/\d+">([^<]*)</a></h2>', html)]


def test_the_grid_shows_every_adapter_as_a_card_with_its_facts(web):
    page = web.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert sorted(card_names(page.text)) == sorted(web.demo.ids)
    assert "1–6 of 6 adapters" in page.text
    pixel = page.text[page.text.index(f'data-id="{web.demo.ids["pixel-art"]}"'):]
    pixel = pixel[:pixel.index("</article>")]
    assert f'src="/media/{web.demo.ids["pixel-art"]}/sample/0"' in pixel
    for text in ("sd1", "kohya", "rank 4", ">style<", ">retro<", 'data-copy="pxl style"', 'data-copy="&lt;lora:pixel-art:0.8&gt;"'):
        assert text in pixel, text
    cyber = page.text[page.text.index(f'data-id="{web.demo.ids["cyber-city"]}"'):]
    assert f'src="/media/{web.demo.ids["cyber-city"]}/preview"' in cyber[:cyber.index("</article>")]
    # the filter menus offer what the catalog holds, with counts
    assert '<option value="peft" >peft (1)</option>' in page.text.replace("  ", " ")
    assert '<option value="style" >style (3)</option>' in page.text.replace("  ", " ")


@pytest.mark.parametrize(("query", "expected"), [
    ("q=water", {"watercolor", "pixel-watercolor"}),
    ("q=castle", {"pixel-art", "pixel-art_peft"}),  # a caption tag of pixel-art (its conversion keeps the metadata)
    ("tag=painting", {"watercolor"}),
    ("tag=style", {"pixel-art", "watercolor", "ink-sketch"}),
    ("format=peft", {"pixel-art_peft"}),
    ("arch=sd1&tag=scene", {"cyber-city"}),
    ("base=v1-5-pruned-emaonly", {"pixel-art", "watercolor", "cyber-city", "ink-sketch", "pixel-art_peft"}),
    ("base=sd_xl_base", set()),
    ("q=pixel&format=kohya", {"pixel-art", "pixel-watercolor"}),
])
def test_filters_and_search_narrow_the_grid(web, query, expected):
    fragment = web.client.get(f"/cards?{query}")
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert set(card_names(fragment.text)) == expected
    assert set(card_names(web.client.get(f"/?{query}").text)) == expected


def test_sorting_and_pages(web, monkeypatch):
    import lorareg.web.app as app_module

    sizes = {name: (web.demo.files / f"{name}.safetensors").stat().st_size for name in STYLES}
    by_size = card_names(web.client.get("/cards?sort=size").text)
    known = [n for n in by_size if n in sizes]
    assert [sizes[n] for n in known] == sorted(sizes.values(), reverse=True)
    searched = card_names(web.client.get("/cards?q=pixel&sort=name").text)
    assert searched == sorted(["pixel-art", "pixel-art_peft", "pixel-watercolor"])
    monkeypatch.setattr(app_module, "PAGE_SIZE", 4)
    first = web.client.get("/cards").text
    second = web.client.get("/cards?page=2").text
    assert card_names(first) == sorted(web.demo.ids, key=str.casefold)[:4]
    assert card_names(second) == sorted(web.demo.ids, key=str.casefold)[4:]
    assert 'href="/?page=2" rel="next"' in first and 'href="/?page=1" rel="prev"' in second
    assert "5–6 of 6" in second


def test_a_search_the_index_cannot_parse_is_one_readable_line(web):
    page = web.client.get("/cards", params={"q": 'tags:"unclosed'})
    assert page.status_code == 200
    assert "not valid full-text query syntax" in page.text and card_names(page.text) == []


def test_the_detail_page_shows_hashes_settings_captions_samples_and_the_copy_tag(web):
    entry_id = web.demo.ids["pixel-art"]
    page = web.client.get(f"/a/{entry_id}").text
    data = (web.demo.files / "pixel-art.safetensors").read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    assert f"<code>{sha256[:10]}</code>" in page and f"<code>{sha256}</code>" in page  # AutoV2 and SHA-256
    with Catalog(web.demo.home) as catalog:
        tensor_sha256 = catalog.by_id(entry_id).tensor_sha256
    from loralib.inspection import inspect

    assert inspect(web.demo.files / "pixel-art.safetensors").hashes["tensor_sha256"] == tensor_sha256
    assert f"<code>{tensor_sha256}</code>" in page and f"<code>{tensor_sha256[:12]}</code>" in page  # AutoV3, A1111
    assert 'data-copy="&lt;lora:pixel-art:0.8&gt;"' in page
    assert "<th>optimizer</th><td>bitsandbytes.optim.adamw.AdamW8bit</td>" in page
    assert "<th>max_train_steps</th><td>1600</td>" in page and "tag_frequency" not in page.split("All metadata")[0]
    for tag, count in STYLES["pixel-art"]["captions"].items():
        assert f'title="{count} captions">{tag}</span>' in page
    assert "pxl style, a castle on a hill, 0" in page and "Seed: 7" in page and "Seed: 8" in page
    assert f'src="/media/{entry_id}/sample/1"' in page
    same = page[page.index("Same adapter"):page.index("<h3>Files</h3>")]
    assert f'href="/a/{web.demo.ids["pixel-art_peft"]}">pixel-art_peft</a>' in same
    assert "Used by:" in page and ">pixel-watercolor</a>" in page


def test_the_lineage_is_drawn_with_weights_and_links(web):
    page = web.client.get(f"/a/{web.demo.ids['pixel-watercolor']}").text
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert svg.count("<rect") == 3 and svg.count('class="edge"') == 2
    assert ">× 0.7<" in svg and ">× 0.3<" in svg
    with Catalog(web.demo.home) as catalog:
        parent = catalog.by_id(web.demo.ids["pixel-art"])
    assert f'href="/h/{parent.tensor_sha256}"' in svg
    jump = web.client.get(f"/h/{parent.tensor_sha256}", follow_redirects=False)
    assert jump.status_code == 303 and jump.headers["location"] == f"/a/{parent.id}"
    assert "merge (method=concat" in svg
    assert web.client.get("/h/" + "0" * 64).status_code == 404


def test_editing_name_tags_triggers_and_notes_changes_the_catalog(web):
    entry_id = web.demo.ids["watercolor"]
    done = web.post(f"/a/{entry_id}/edit", {"name": "watercolour", "tags": "painting, Soft Light ", "triggers": "wtrclr, wet paper",
                                            "notes": "Edited <b>here</b>"})
    assert done.status_code == 303 and done.headers["location"] == f"/a/{entry_id}?saved=1#edit"
    with Catalog(web.demo.home) as catalog:
        entry = catalog.by_id(entry_id)
    assert entry.name == "watercolour" and entry.tags == ["painting", "soft light"]
    assert entry.triggers == ["wtrclr", "wet paper"] and entry.description == "Edited <b>here</b>"
    page = web.client.get(f"/a/{entry_id}?saved=1").text
    assert "Saved." in page and "Edited &lt;b&gt;here&lt;/b&gt;" in page
    assert set(card_names(web.client.get("/cards?tag=soft light").text)) == {"watercolour"}


def test_an_edit_the_catalog_refuses_is_shown_and_changes_nothing(web):
    entry_id = web.demo.ids["watercolor"]
    refused = web.post(f"/a/{entry_id}/edit", {"name": "pixel-art", "tags": "x", "triggers": "", "notes": ""})
    assert refused.status_code == 400 and "already used by another adapter" in refused.text
    refused = web.post(f"/a/{entry_id}/edit", {"name": "a/b", "tags": "", "triggers": "", "notes": ""})
    assert refused.status_code == 400 and "slash" in refused.text
    with Catalog(web.demo.home) as catalog:
        assert catalog.by_id(entry_id).name == "watercolor" and catalog.by_id(entry_id).tags == ["style", "painting"]
    assert web.post("/a/999999/edit", {"name": "x"}).status_code == 404


def test_compare_puts_adapters_side_by_side_and_marks_differences(web):
    ids = web.demo.ids
    page = web.client.get(f"/compare?id={ids['pixel-art']}&id={ids['watercolor']}&id={ids['pixel-watercolor']}").text
    heads = re.findall(r'<th><a href="/a/(\d+)">', page)
    assert heads == [str(ids["pixel-art"]), str(ids["watercolor"]), str(ids["pixel-watercolor"])]
    assert re.search(r'<tr class="differs"><th>rank</th><td>4</td><td>4</td><td>8</td></tr>', page)
    assert re.search(r"<tr><th>format</th><td>kohya</td><td>kohya</td><td>kohya</td></tr>", page)
    assert "<th>num_epochs</th><td>8</td><td>9</td><td>—</td>" in page
    assert page.count("/sample/") == 3  # two samples of pixel-art, one of watercolor
    assert "Select two or more" in web.client.get("/compare").text


def test_the_merge_builder_starts_with_the_chosen_adapters_and_finds_others(web):
    ids = web.demo.ids
    page = web.client.get(f"/merge?id={ids['pixel-art']}&id={ids['watercolor']}").text
    assert re.findall(r'name="adapter" value="(\d+)"', page) == [str(ids["pixel-art"]), str(ids["watercolor"])]
    assert page.count('value="0.50"') == 2
    found = web.client.get("/pick?q=ink").json()
    assert [item["name"] for item in found] == ["ink-sketch"] and found[0]["id"] == ids["ink-sketch"]
    assert web.client.get("/pick?q=%22").json() == []


def test_images_are_served_from_the_catalog_with_their_real_type(web):
    ids = web.demo.ids
    sample = web.client.get(f"/media/{ids['pixel-art']}/sample/1")
    assert sample.status_code == 200 and sample.headers["content-type"] == "image/png"
    assert sample.content == (web.demo.files / "samples" / "pixel-art-1.png").read_bytes()
    preview = web.client.get(f"/media/{ids['cyber-city']}/preview")
    assert preview.content == (web.demo.files / "cyber-city.preview.png").read_bytes()
    assert web.client.get(f"/media/{ids['pixel-art']}/sample/2").status_code == 404
    assert web.client.get(f"/media/{ids['pixel-art']}/preview").status_code == 404
    assert web.client.get("/media/999/sample/0").status_code == 404


def test_unknown_pages_and_jobs_answer_404_pages(web):
    for path in ("/a/999999", "/jobs/12345", "/jobs/12345/status", "/nothing-here"):
        answer = web.client.get(path)
        assert answer.status_code == 404, path
    assert "There is no adapter 999999" in web.client.get("/a/999999").text
    assert "No jobs yet" in web.client.get("/jobs").text
    assert web.client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert json.loads(web.client.get("/pick").text)  # recent entries without a query
