#!/usr/bin/env bash
# Create .venv and install the pinned requirements (torch==2.13.0 resolves to the CPU build on project machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
