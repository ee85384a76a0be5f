#!/usr/bin/env bash
# Run the whole test suite (installs what it needs into .venv first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -n "${LORAREG_TEST_WORKERS:-auto}" --dist loadfile "$@"
