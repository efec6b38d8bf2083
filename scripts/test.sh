#!/usr/bin/env bash
# Install everything needed for the tests, then run the whole suite (slow multi-peer tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
exec .venv/bin/python -m pytest -q --durations=15 "$@"
