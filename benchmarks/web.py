"""Playground speed, measured in Chromium on a 100,000-entry catalog.

    .venv/bin/python benchmarks/web.py [--entries 100000] [--runs 7]

Goals (issue 13): first paint of the grid < 1 s, a filter or search answered < 300 ms, a detail
page < 300 ms.

The catalog is built as benchmarks/registry.py builds it (synthetic rows shaped like real
entries). ``lorareg serve`` runs as its own process, as a user starts it; the browser is
Debian's Chromium through selenium (tests/helpers/browser.py), with a fresh profile; pages are
sent with ``Cache-Control: no-store``, so every page is fetched and rendered anew. Measured:

- grid: First Contentful Paint of ``/`` (the browser's own paint timing, from navigation start), as
  a first visit (HTTP cache disabled: style and script fetched too) and with them cached;
- filter/search: from the moment the page sends the request to the moment the new cards are in
  the page (the grid's ``lorareg:results`` event), and from the input event (the page waits
  120 ms after the last keystroke before asking, so typing does not send a request per letter);
- detail: First Contentful Paint of ``/a/ID`` for entries spread over the catalog, arriving from the
  grid (style and script cached; pages themselves are never cached).

Baseline in the same run: First Contentful Paint of a one-line static HTML file opened from
disk (the browser's own floor for showing anything).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.registry import build_catalog  # noqa: E402
from tests.helpers.browser import browser_missing, start_chromium  # noqa: E402

QUERIES = [  # (label, field, value[, other fields set first])
    ("search 'pixel' (about a third match)", "q", "pixel"),
    ("search 'neon castle'", "q", "neon castle"),
    ("search 'tags:anime NOT retro'", "q", "tags:anime NOT retro"),
    ("tag = anime", "tag", "anime"),
    ("architecture = sdxl", "arch", "sdxl"),
    ("format = peft", "format", "peft"),
    ("base model 'sd_xl_base'", "base", "sd_xl_base"),
    ("sort by size", "sort", "size"),
    ("search 'pixel', sorted by name", "q", "pixel", {"sort": "name"}),
]

FILTER_SCRIPT = """
const [field, value, presets, done] = arguments;
const form = document.getElementById('filters');
for (const element of form.elements) { if (element.name) element.value = presets[element.name] || ''; }
const input = form.elements[field];
document.addEventListener('lorareg:results', (event) => {
  done({fromInput: event.detail.shown - started, answered: event.detail.shown - event.detail.requestStarted,
        cards: document.querySelectorAll('#results .card').length,
        count: document.querySelector('#results .count').textContent.trim()});
}, {once: true});
input.value = value;
const started = performance.now();
input.dispatchEvent(new Event(input.tagName === 'SELECT' ? 'change' : 'input', {bubbles: true}));
"""

PAINT = "return performance.getEntriesByName('first-contentful-paint').map(e => e.startTime)[0] || null;"
FIRST_BYTE = "return performance.getEntriesByType('navigation')[0].responseStart;"


def _paint(driver, url: str, first_bytes: list | None = None) -> float:
    driver.get(url)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        value = driver.execute_script(PAINT)
        if value:
            if first_bytes is not None:
                first_bytes.append(float(driver.execute_script(FIRST_BYTE)))
            return float(value)
        time.sleep(0.02)
    raise SystemExit(f"no paint for {url}")


def _start_server(home: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "LORAREG_HOME": str(home), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lorareg", "serve", "--port", "0"], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    match = re.search(r"(http://\S+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"lorareg serve did not start: {line}{process.stderr.read()}")
    return process, match.group(1).rstrip("/")


def run(entries: int, runs: int, catalog: Path | None = None) -> dict:
    """Build the catalog (or use ``catalog``, built earlier by this script), start the server and the browser, measure."""
    missing = browser_missing()
    if missing:
        raise SystemExit(missing)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lorareg-web-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        start = time.perf_counter()
        if catalog is not None and (catalog / "catalog.db").is_file():
            home = catalog
        else:
            build_catalog(catalog or home, entries)
            home = catalog or home
        built = time.perf_counter() - start
        floor_page = work / "floor.html"
        floor_page.write_text("<!doctype html><title>x</title><p>baseline</p>")
        process, url = _start_server(home)
        driver = start_chromium(profile=work / "profile")
        try:
            _paint(driver, url + "/")  # warm the server process and the browser once
            driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
            grid_ttfb: list[float] = []
            grid = [_paint(driver, url + "/", grid_ttfb) for _ in range(runs)]  # as a first visit: style and script too
            driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": False})
            grid_warm = [_paint(driver, url + "/") for _ in range(runs)]
            floor = [_paint(driver, floor_page.as_uri()) for _ in range(runs)]
            filters = {}
            for label, field, value, *presets in QUERIES:
                samples = []
                for _ in range(runs):
                    _paint(driver, url + "/")
                    samples.append(driver.execute_async_script(FILTER_SCRIPT, field, value, *(presets or [{}])))
                filters[label] = samples
            rnd = random.Random(1)
            ids = [rnd.randrange(1, entries + 1) for _ in range(runs)]
            detail_ttfb: list[float] = []
            detail = [_paint(driver, f"{url}/a/{i}", detail_ttfb) for i in ids]
            names = driver.find_elements("css selector", "h1")
            assert names and names[0].text, "the detail page shows no name"
        finally:
            driver.quit()
            process.terminate()
            process.wait(10)
    size = entries
    return {"entries": size, "build_s": built, "runs": runs, "load_before": load_before, "load_after": os.getloadavg(),
            "grid_fcp_ms": grid, "grid_warm_fcp_ms": grid_warm, "floor_fcp_ms": floor, "detail_fcp_ms": detail, "grid_first_byte_ms": grid_ttfb, "detail_first_byte_ms": detail_ttfb,
            "filters": {k: {"answered_ms": [s["answered"] for s in v], "from_input_ms": [s["fromInput"] for s in v],
                            "cards": v[0]["cards"], "count": v[0]["count"]} for k, v in filters.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--catalog", type=Path, help="keep the built catalog in this folder, and reuse it when it "
                                                         "is there (building 100,000 entries takes minutes)")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = parser.parse_args()
    result = run(args.entries, args.runs, args.catalog)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    med = statistics.median
    floor = med(result["floor_fcp_ms"])
    print(f"catalog of {result['entries']:,} entries (built or opened in {result['build_s']:.1f} s); median (max) of "
          f"{result['runs']} runs; load average {result['load_before'][0]:.1f} before, "
          f"{result['load_after'][0]:.1f} after")
    print(f"  baseline: static one-line page from disk, first paint  {floor:6.0f} ms (max {max(result['floor_fcp_ms']):.0f})")
    grid = result["grid_fcp_ms"]
    print(f"  grid /, first paint, first visit (no cache)        {med(grid):6.0f} ms (max {max(grid):.0f})  "
          f"goal < 1000; {med(grid) / floor:.1f}x the baseline")
    print(f"    of which waiting for the page's first byte      {med(result['grid_first_byte_ms']):6.0f} ms")
    warm = result["grid_warm_fcp_ms"]
    print(f"  grid /, first paint, style and script cached       {med(warm):6.0f} ms (max {max(warm):.0f})")
    for label, values in result["filters"].items():
        answered, typed = values["answered_ms"], values["from_input_ms"]
        print(f"  {label:<44} answered {med(answered):5.0f} ms (max {max(answered):.0f}), from the input event "
              f"{med(typed):5.0f} ms  [{values['count']}]  goal < 300")
    detail = result["detail_fcp_ms"]
    print(f"  detail /a/ID, first paint (from the grid: cached)  {med(detail):6.0f} ms (max {max(detail):.0f})  "
          f"goal < 300")
    print(f"    of which waiting for the page's first byte      {med(result['detail_first_byte_ms']):6.0f} ms")


if __name__ == "__main__":
    main()
