#!/usr/bin/env bash
# The README's main command: set up, then run the allocation demo and print its report.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${VENV:-.venv}/bin/python" examples/demo_allocations.py "$@"
