#!/usr/bin/env bash
# Create the project's virtual environment (.venv) and install lorareg with the tested versions.
# Safe to run repeatedly: it reinstalls only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
stamp=".venv/.installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"

if [[ ! -x .venv/bin/python ]]; then
    echo "lorareg: creating the virtual environment in .venv" >&2
    "$PYTHON" -m venv .venv
fi
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "lorareg: installing lorareg and its pinned dependencies (constraints.txt) into .venv" >&2
    # constraints.txt pins torch 2.13.0, the CPU build; an unpinned torch would download a CUDA build.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
    echo "$want" > "$stamp"
fi
