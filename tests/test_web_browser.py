"""The playground in a real browser: Debian's Chromium driven by selenium (tests/helpers/browser.py).

One server and one browser for the module. The walk: load the grid, filter it as you type,
open a detail page and copy its prompt tag, edit a tag, build a merge and open the new entry,
then export the gallery and use it from disk. Screenshots go to the test's temporary folder
(look at them when a test fails; they are not kept in the repository).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lorareg.registry.catalog import Catalog
from tests.helpers.browser import browser_missing, start_chromium

pytestmark = pytest.mark.usefixtures("isolated_environment")

MISSING = browser_missing()
if MISSING:  # CI installs the browser (scripts/test.sh -> scripts/browser.sh); there it must not be skipped
    if os.environ.get("CI"):
        raise RuntimeError(f"the browser tests cannot run: {MISSING}")
    pytest.skip(MISSING, allow_module_level=True)


@pytest.fixture(scope="module")
def site(demo_catalog_template, tmp_path_factory):
    """The demo catalog (a private copy), served on a free loopback port, and a browser."""
    from lorareg.web.actions import Settings
    from lorareg.web.server import BackgroundServer

    root = tmp_path_factory.mktemp("browser")
    home = root / "home"
    shutil.copytree(demo_catalog_template.home, home)
    with BackgroundServer(Settings(str(home), root / "out")) as server:
        driver = start_chromium(profile=root / "profile")
        try:
            yield Site(server, driver, home, root, demo_catalog_template.ids)
        finally:
            driver.quit()


class Site:
    def __init__(self, server, driver, home: Path, root: Path, ids: dict[str, int]) -> None:
        self.server, self.driver, self.home, self.root, self.ids = server, driver, home, root, ids

    def open(self, path: str) -> None:
        self.driver.get(self.server.url + path)

    def wait(self, condition, timeout: float = 15):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda d: condition())

    def css(self, selector: str):
        return self.driver.find_elements("css selector", selector)

    def names(self) -> list[str]:
        """The names on the visible cards (read in one script: the grid may be replaced meanwhile)."""
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll('#results .card h2 a, #gallery .card h2 a'))"
            ".filter(a => a.offsetParent !== null).map(a => a.textContent);")

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.root / f"{name}.png"))

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]


def test_the_grid_loads_with_cards_and_their_images(site):
    site.open("/")
    site.wait(lambda: len(site.names()) == 6)
    assert sorted(site.names()) == sorted(site.ids)
    image = site.driver.find_element("css selector", f'.card[data-id="{site.ids["pixel-art"]}"] img')
    site.wait(lambda: site.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    assert site.driver.execute_script("return arguments[0].naturalWidth", image) == 96
    site.shot("grid")
    assert site.console_errors() == []


def test_the_grid_filters_as_you_type(site):
    from selenium.webdriver.support.ui import Select

    site.open("/")
    box = site.driver.find_element("css selector", "#filters input[name=q]")
    box.send_keys("water")
    site.wait(lambda: sorted(site.names()) == ["pixel-watercolor", "watercolor"])
    assert "q=water" in site.driver.current_url
    box.clear()
    box.send_keys(" ")  # an input event with an empty search
    Select(site.driver.find_element("css selector", "#filters select[name=tag]")).select_by_value("style")
    site.wait(lambda: sorted(site.names()) == ["ink-sketch", "pixel-art", "watercolor"])
    Select(site.driver.find_element("css selector", "#filters select[name=format]")).select_by_value("peft")
    site.wait(lambda: site.names() == [] and "No adapter matches" in site.css("#results .count")[0].text)
    site.shot("filtered")
    site.driver.back()  # the filters live in the address, so going back restores the last state
    assert site.console_errors() == []


def test_a_detail_page_opens_from_its_card_and_copies_the_prompt_tag(site):
    site.open("/")
    site.wait(lambda: len(site.names()) == 6)
    site.driver.find_element("link text", "pixel-watercolor").click()
    site.wait(lambda: site.css("h1") and site.css("h1")[0].text == "pixel-watercolor")
    svg_text = site.css(".lineage svg")[0].text
    assert "pixel-art" in svg_text and "watercolor" in svg_text and "× 0.7" in svg_text
    site.driver.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": site.server.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    site.driver.find_element("id", "copy-lora").click()
    site.wait(lambda: "copied" in site.driver.find_element("id", "copy-lora").get_attribute("class"))
    copied = site.driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; navigator.clipboard.readText().then(done, e => done('ERR ' + e));")
    assert copied == "<lora:pixel-watercolor:0.8>"
    site.shot("detail")


def test_a_tag_edited_in_the_page_is_saved_in_the_catalog(site):
    entry_id = site.ids["ink-sketch"]
    site.open(f"/a/{entry_id}")
    tags = site.driver.find_element("id", "edit-tags")
    tags.send_keys(", favourite")
    tags.submit()
    site.wait(lambda: site.css("#saved"))
    assert [a.text for a in site.css("#entry-tags a")] == ["style", "favourite"]
    with Catalog(site.home) as catalog:
        assert catalog.by_id(entry_id).tags == ["style", "favourite"]


def test_a_merge_built_in_the_page_ends_on_the_new_entry(site):
    site.open("/merge")
    picker = site.driver.find_element("id", "pick-query")
    pick = ("const b = Array.from(document.querySelectorAll('#pick-results button'))"
            ".find(b => b.textContent.startsWith(arguments[0])); if (b) b.click(); return !!b;")
    for query, name in (("ink", "ink-sketch"), ("cyber", "cyber-city")):
        picker.clear()
        picker.send_keys(query)
        site.wait(lambda name=name: site.driver.execute_script(pick, name + " ("))
    rows = site.css("#merge-inputs tr")
    assert [r.text.split()[0] for r in rows] == ["ink-sketch", "cyber-city"]
    for row, weight in zip(rows, ("0.6", "0.4"), strict=True):
        field = row.find_element("css selector", "input[name=weight]")
        field.clear()
        field.send_keys(weight)
    site.driver.find_element("id", "merge-output").send_keys("browser-mix")
    site.driver.find_element("id", "merge-submit").click()
    site.wait(lambda: site.css("#job-state") and site.css("#job-state")[0].text in ("done", "failed"), timeout=60)
    assert site.css("#job-state")[0].text == "done", site.css("#job-error")[0].text
    site.wait(lambda: site.css("#job-entry"))
    site.shot("job")
    site.css("#job-entry")[0].click()
    site.wait(lambda: site.css("h1") and site.css("h1")[0].text == "browser-mix")
    svg_text = site.css(".lineage svg")[0].text
    assert "ink-sketch" in svg_text and "cyber-city" in svg_text and "× 0.6" in svg_text and "× 0.4" in svg_text
    with Catalog(site.home) as catalog:
        entry = catalog.by_name("browser-mix")
        assert [(p.name, p.weight) for p in catalog.parents(entry)] == [("ink-sketch", 0.6), ("cyber-city", 0.4)]
    assert (site.root / "out" / "browser-mix.safetensors").is_file()


def test_the_exported_gallery_works_from_disk(site):
    from lorareg.web.site import export_site

    folder = site.root / "gallery"
    report = export_site(site.home, folder)
    site.driver.get((folder / "index.html").as_uri())
    site.wait(lambda: len(site.names()) == report.entries)
    image = site.css('#gallery .card img')[0]
    site.wait(lambda: site.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    site.driver.find_element("css selector", "#gallery-filters input[name=q]").send_keys("pxl")
    site.wait(lambda: sorted(site.names()) == ["pixel-art", "pixel-art_peft"])
    assert site.css("#shown")[0].text == "2"
    site.shot("gallery")
    site.driver.find_element("link text", "pixel-art").click()
    site.wait(lambda: site.css("h1") and site.css("h1")[0].text == "pixel-art")
    samples = site.css(".samples img")
    assert len(samples) == 2
    site.wait(lambda: all(site.driver.execute_script("return arguments[0].naturalWidth", i) for i in samples))
    assert site.driver.current_url.startswith("file://")
    assert site.console_errors() == []
