#!/usr/bin/env bash
# Set up, then run the whole suite: the fast default plus the tests marked slow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout 900 --run-slow "$@"
