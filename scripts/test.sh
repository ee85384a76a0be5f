#!/usr/bin/env bash
# Run the whole test suite (installs what it needs first: .venv, and Chromium for the browser
# tests): ruff, then pytest on every core. Extra arguments go to pytest. Each worker runs torch on
# one thread (LORAREG_TEST_THREADS).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/browser.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -n "${LORAREG_TEST_WORKERS:-auto}" --dist loadfile "$@"
