#!/usr/bin/env bash
# The README's main command: set up with the lab extra, prepare the embedded Shakespeare corpus, run the demo
# sweep of the paper's five allocations on a tiny GPT on the CPU, and build the report.
# Extra arguments go to the sweep (e.g. --seeds 1,2 or --max_iters=300).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh lab
MM="${VENV:-.venv}/bin/manifold-muon"
[ -f data/shakespeare/meta.json ] || "$MM" prepare shakespeare --out data/shakespeare
"$MM" sweep --preset tiny-cpu \
    --seeds 1 --out runs/demo --jobs 2 --data_dir=data/shakespeare "$@"
"$MM" report runs/demo
