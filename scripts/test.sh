#!/usr/bin/env bash
# The README's test command: set up with the test extras, then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
