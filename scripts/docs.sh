#!/usr/bin/env bash
# Build the documentation site (mkdocs, strict: a broken link or reference fails) into site/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh docs
NO_MKDOCS_2_WARNING=1 exec "${VENV:-.venv}/bin/mkdocs" build --strict --site-dir site "$@"
