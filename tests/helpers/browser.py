"""Debian's Chromium driven by selenium, for the playground's browser tests, benchmark and screenshots.

``scripts/browser.sh`` (run by ``scripts/test.sh``) installs ``chromium`` and ``chromium-driver``
with apt when they are missing. The browser runs headless with a fresh profile and without the
background connections (updates, sync, safe browsing…) that a closed network refuses.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--disable-extensions",
         "--disable-default-apps", "--mute-audio", "--hide-scrollbars")


def browser_missing() -> str | None:
    """Why the browser cannot be started here (None when it can)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing: run `bash scripts/browser.sh` (scripts/test.sh does)"
    return None


def start_chromium(width: int = 1280, height: int = 900, profile: str | os.PathLike | None = None):
    """A selenium WebDriver on a headless Chromium with a fresh profile (removed when the driver quits)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile_dir = Path(profile) if profile else Path(tempfile.mkdtemp(prefix="lorareg-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument(f"--user-data-dir={profile_dir}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    return driver
