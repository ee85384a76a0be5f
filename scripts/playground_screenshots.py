"""Take the screenshots of docs/playground.md from the real pages.

    .venv/bin/python scripts/playground_screenshots.py [OUTPUT_DIR]     (default: docs/images)

Builds the demo collection of the tests (tests/helpers/web_catalog.py) in a temporary catalog,
serves it with the playground, runs a merge job through the page, exports the gallery, and
captures each page with the system Chromium (scripts/browser.sh installs it). The PNGs are
reduced to a 256-colour palette to stay small.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.browser import browser_missing, start_chromium  # noqa: E402
from tests.helpers.web_catalog import build_demo_catalog  # noqa: E402

WIDTH = 1200


def capture(driver, path: Path, height: int | None = None) -> None:
    """A screenshot of the whole page (or its first ``height`` pixels), palette-reduced."""
    from PIL import Image

    time.sleep(0.3)
    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WIDTH, min(height or full, 2400) + 90)
    time.sleep(0.2)
    driver.save_screenshot(str(path))
    image = Image.open(path).convert("RGB")
    image = image.crop((0, 0, image.width, min(image.height, height or image.height)))
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def capture_element(driver, selector: str, path: Path) -> None:
    """A screenshot of one element of the page, palette-reduced."""
    from PIL import Image

    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(WIDTH, min(full, 2400) + 90)
    time.sleep(0.3)
    driver.find_element("css selector", selector).screenshot(str(path))
    Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def main() -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    from lorareg.web.actions import Settings
    from lorareg.web.server import BackgroundServer
    from lorareg.web.site import export_site

    missing = browser_missing()
    if missing:
        raise SystemExit(missing)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "images"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lorareg-shots-") as tmp:
        work = Path(tmp)
        ids = build_demo_catalog(work / "home", work / "files")
        with BackgroundServer(Settings(str(work / "home"), work / "outputs")) as server:
            driver = start_chromium(WIDTH, 900, profile=work / "profile")
            wait = WebDriverWait(driver, 30, poll_frequency=0.05)
            try:
                driver.get(server.url + "/")
                capture(driver, out / "playground-grid.png", 760)
                driver.get(server.url + "/?q=pxl")
                capture(driver, out / "playground-search.png", 620)
                driver.get(f"{server.url}/a/{ids['pixel-art']}")
                capture(driver, out / "playground-detail.png", 1500)
                driver.get(f"{server.url}/a/{ids['pixel-watercolor']}")
                capture_element(driver, ".lineage", out / "playground-lineage.png")
                driver.get(f"{server.url}/compare?id={ids['pixel-art']}&id={ids['watercolor']}&id={ids['pixel-watercolor']}")
                capture(driver, out / "playground-compare.png")
                driver.get(f"{server.url}/merge?id={ids['pixel-art']}&id={ids['ink-sketch']}")
                driver.find_element("id", "merge-output").send_keys("pixel-ink")
                capture(driver, out / "playground-merge.png", 520)
                driver.find_element("id", "merge-submit").click()
                wait.until(lambda d: d.find_elements("id", "job-entry"))
                capture(driver, out / "playground-job.png", 300)
                export_site(work / "home", work / "site", title="My LoRA gallery")
                driver.get((work / "site" / "index.html").as_uri())
                capture(driver, out / "playground-gallery.png", 760)
            finally:
                driver.quit()


if __name__ == "__main__":
    main()
