#!/usr/bin/env bash
# Run the whole test suite (installs what it needs first: .venv, and Chromium for the browser tests).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/browser.sh
exec .venv/bin/python -m pytest -n "${LORAREG_TEST_WORKERS:-auto}" --dist loadfile "$@"
