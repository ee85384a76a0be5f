#!/usr/bin/env bash
# Make sure Debian's Chromium and its WebDriver are installed: the playground's browser tests
# (tests/test_web_browser.py) drive /usr/bin/chromium through /usr/bin/chromedriver.
# Does nothing when both are there; otherwise installs them with apt-get (as root, or with sudo).
set -euo pipefail

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "lorareg: /usr/bin/chromium or /usr/bin/chromedriver is missing and apt-get is not available;" \
         "install Chromium and chromedriver to run the browser tests" >&2
    exit 0
fi
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "lorareg: the browser tests need chromium and chromium-driver:" \
             "sudo apt-get install chromium chromium-driver" >&2
        exit 0
    fi
fi
echo "lorareg: installing chromium and chromium-driver with apt-get (for the browser tests)" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
