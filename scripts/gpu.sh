#!/usr/bin/env bash
# The GPU measurements, sized for a borrowed machine with no package registry: a time budget per
# call (at most 10 minutes), few files back from $OUT, and at most 64 MiB of working tree and
# carried files sent to it.  The code runs from the source tree (PYTHONPATH=src).
#
# Here, once (needs data/local-corpus: `python scripts/build_local_corpus.py`):
#   bash scripts/gpu.sh prepare   -> gpu-carry/ (ignored): the corpus's token files, xz-compressed
#                                    (39 -> 15 MB), and a tqdm wheel; fails if the tree and the
#                                    carry together would not fit in 64 MiB
# There, with gpu-carry carried, one stage per call:
#   bash scripts/gpu.sh first                       the first call (FIRST_S, default 540 s; give
#                                                   the call a 600 s limit): the bench table at
#                                                   GPT-2 small, 65,536 tokens/step, compiled forward
#                                                   (paper and fast mode), hetero and Muon again with
#                                                   compiled directions beside eager ones (both benches
#                                                   profile a step of each configuration), the levers
#                                                   at its shapes, fast mode with TF32, improved mode's
#                                                   price (hetero, 16 iterations); a summary table last
#   bash scripts/gpu.sh bench [OVERRIDES]           the bench alone, e.g. --matmul_precision=high
#   bash scripts/gpu.sh levers                      benchmarks/fast_path.py at GPT-2 small's shapes
#   bash scripts/gpu.sh sweep MODES SEEDS [ALLOCS] [OVERRIDES]  gpt2-reduced runs, e.g.
#                                                   `sweep paper,improved 1` or `sweep improved 1 hetero --dual_steps=8`,
#                                                   then `quality` on every run with a checkpoint here;
#                                                   other settings need their own folder, e.g.
#                                                   `RESULTS=results/gpt2-reduced-lr8x bash scripts/gpu.sh sweep
#                                                   paper,improved 1 all-stiefel,all-dgram --muon_lr=0.16`
#   bash scripts/gpu.sh quality [RUN_DIR ...]       direction quality, per matrix group, on
#                                                   the final momenta of runs (default: every
#                                                   constrained run here with a checkpoint)
#   bash scripts/gpu.sh report                      report over results/gpt2-reduced
# Every stage leaves its numbers in $OUT: bench, lever or quality JSONs, or results.tgz (finished
# runs, packed, without checkpoints, which stay on the device) to unpack here and commit, so the
# next call's sweep skips them.  Here, `OUT=out/gpu-dry PYTHON=.venv/bin/python GPU_DRY=1 bash
# scripts/gpu.sh first` runs the `first` stage at toy sizes on the CPU (the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-}"
shift || true
OUT="${OUT:-out/gpu}"
PYTHON="${PYTHON:-python3}"   # the GPU machine's python3 holds its PyTorch
BUDGET_S="${BUDGET_S:-480}"   # the sweep stops here, leaving time to pack and measure what finished
QUALITY_S="${QUALITY_S:-60}"  # direction quality on the finished runs' momenta
FIRST_S="${FIRST_S:-540}"     # the whole `first` stage
SWEEP_JOBS="${SWEEP_JOBS:-4}" # gpt2-reduced runs side by side on the one GPU (~10 GB each, estimated; launches and
                              # syncs leave a large GPU idle, which the other runs fill)
RESULTS="${RESULTS:-results/gpt2-reduced}"
LIMIT_MIB=62                  # the device takes 64 MiB of tree and carry; keep a margin

setup_device() {
  mkdir -p "$OUT"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$PYTHON" -c "import tqdm" 2>/dev/null; then   # pure Python: a wheel is importable as is
    PYTHONPATH="$PYTHONPATH:$(ls gpu-carry/wheels/tqdm-*.whl | head -1)"
  fi
  "$PYTHON" - <<'EOF'
import torch
print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
EOF
}

setup_corpus() {  # the carried corpus, decompressed and checked against its meta.json
  [ -f data/local-corpus/train.bin ] && return 0
  mkdir -p data/local-corpus
  "$PYTHON" - <<'EOF'
import hashlib, json, lzma, shutil
from pathlib import Path
src, dst = Path("gpu-carry/local-corpus"), Path("data/local-corpus")
meta = json.loads((src / "meta.json").read_text())
for name in ("train.bin", "val.bin"):
    data = lzma.decompress((src / (name + ".xz")).read_bytes())
    if hashlib.sha256(data).hexdigest() != meta["sha256"][name]:
        raise SystemExit(f"gpu-carry/local-corpus/{name}.xz does not match meta.json's sha256: run `gpu.sh prepare` again")
    (dst / name).write_bytes(data)
shutil.copy(src / "meta.json", dst / "meta.json")
print(f"corpus: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, checksums match")
EOF
}

pack_results() {
  "$PYTHON" -m manifold_muon pack "$RESULTS" || true   # finished runs' logs xz-compressed, as committed
  tar czf "$OUT/results.tgz" --exclude=ckpt.pt --exclude='*.tmp' "$RESULTS" 2>/dev/null || true
  ls -la "$OUT"
}

sweep_summary() {  # what the next call needs to size itself: each finished run's time and memory
  "$PYTHON" - "$RESULTS" "$SWEEP_JOBS" <<'EOF'
import json, sys
from pathlib import Path
root, jobs = Path(sys.argv[1]), sys.argv[2]
print(f"\nsweep summary ({jobs} runs side by side; seconds are each run's own wall time)")
for path in sorted(root.glob("*/summary.json")):
    s = json.loads(path.read_text())
    gib = "-" if s.get("peak_gpu_gib") is None else f"{s['peak_gpu_gib']:.1f}"
    print(f"  {path.parent.name:28s} {s['status']:18s} {s['iters']:5d}/{s['max_iters']} it  {s['seconds']:7.1f} s  "
          f"peak {gib:>5} GiB  val {s['final_val_loss']}")
EOF
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

tree_and_carry_mib() {  # what a device call sends: tracked and untracked-not-ignored files present here, and gpu-carry
  { git ls-files -z -co --exclude-standard; if [ -d gpu-carry ]; then find gpu-carry -type f -print0; fi; } \
    | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {printf "%.1f", s / 1048576}'
}

first_stage() {
  local deadline=$((SECONDS + FIRST_S))
  # run_for CAP CMD...: CMD under a timeout of CAP seconds or what is left, skipped under 30 s
  run_for() {
    local cap=$1 left=$((deadline - SECONDS))
    shift
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 30 ]; then echo "first: no time left for: $*"; return 0; fi
    echo "first: ($cap s at most) $*"
    # SIGTERM at the cap: a bench saves the rounds it measured (exit 124); KILL 30 s later if it hangs
    timeout -k 30 "$cap" "$@" || echo "first: stopped or failed: $*"
  }
  local preset=(--preset gpt2-small) levers=(--d 768 --layers 12 --rounds 5) compiled_allocations=hetero
  local compile_again=(--compile)
  if [ -n "${GPU_DRY:-}" ]; then   # toy sizes, for the tests on a CPU (whose compiler takes ~13 s a graph)
    preset=(--preset tiny-cpu --n_layer=1 --n_embd=32 --n_head=2 --block_size=16 --vocab_size=128 --batch_size=2)
    levers=(--d 16 --layers 1 --rounds 1)
    compiled_allocations=unconstrained
    compile_again=()   # the first two benches test compiling; the last two would only repeat it (4-5 s each)
  fi
  # The most wanted numbers first; each step gets what is left of FIRST_S
  # --profile: each configuration's costliest kernels, and how busy they keep the GPU (launch-bound or not)
  run_for 240 "$PYTHON" -m manifold_muon bench "${preset[@]}" --modes paper,fast --rounds 5 --out "$OUT" --compile \
    --profile 8
  run_for 150 "$PYTHON" -m manifold_muon bench "${preset[@]}" --allocations "$compiled_allocations" --modes fast \
    --rounds 5 --out "$OUT" --compile --compile_optimizer --profile 8
  run_for 60 "$PYTHON" benchmarks/fast_path.py "${levers[@]}" --out "$OUT"
  run_for 90 "$PYTHON" -m manifold_muon bench "${preset[@]}" --modes fast --rounds 5 --out "$OUT" "${compile_again[@]}" \
    --matmul_precision=high
  run_for 60 "$PYTHON" -m manifold_muon bench "${preset[@]}" --allocations hetero --modes improved --rounds 2 \
    --out "$OUT/improved" "${compile_again[@]}" --dual_steps=16
  "$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("\nsummary (ms; step/adamw and /fused: the whole step against our AdamW's and torch's fused AdamW's, "
      "measured in the same rounds)")
for path in sorted(out.glob("bench_*.json")) + sorted(out.glob("improved/bench_*.json")):
    r = json.loads(path.read_text())
    print(f"{path.name}: {r['device']}, torch {r['torch']}, compiled {r['compiled']} "
          f"({r.get('compiled_graphs')} graphs for every model; more than 1: some recompiled; "
          f"{r.get('optimizer_graphs', 0)} for compiled directions), "
          f"matmuls '{r['matmul_precision']}'" + (f", optimizer compile errors {r['optimizer_compile_errors']}"
                                                   if r.get("optimizer_compile_errors") else "")
          + (f", CUT SHORT ({r['stopped']}) after {r['rounds']} rounds" if r.get("stopped") else "")
          + (f", cut short after the rounds ({r['extras_stopped']})" if r.get("extras_stopped") else ""))
    for row in r["rows"]:
        align = "-" if row["alignment"] is None else f"{row['alignment']:.3f}"
        ops = "-" if row.get("optimizer_ops") is None else row["optimizer_ops"]
        notes = ("" if row.get("compiled_alignment_gap_max") is None
                 else f"  align vs eager {row['compiled_alignment_gap_max']:.1e}")
        if row.get("device_busy") is not None:   # kernels' time / optimizer wall time (low: launch-bound)
            notes += f"  GPU busy {row['device_busy']:.0%} ({row['profile']['calls']} kernels)"
        print(f"  {row['config']:36s} opt {row['optimizer_ms']:8.1f} ({ops:>5} ops)  step {row['step_ms']:8.1f}  "
              f"step/adamw {row['step_ratio_vs_adamw']:6.3f}  /fused {row.get('step_ratio_vs_fused_adamw') or 0:6.3f}  "
              f"align {align}{notes}")
for path in sorted(out.glob("fast_path_*.json")):
    r = json.loads(path.read_text())
    for manifold, rows in r["rows"].items():
        print(f"{path.name} {manifold}: " + "; ".join(f"{k} {v['vs_muon']:.2f}x" for k, v in rows.items()
                                                     if k.startswith(("fast direction +", "norm:"))))
EOF
}

case "$stage" in
  prepare)
    mkdir -p gpu-carry/local-corpus gpu-carry/wheels
    rm -f gpu-carry/local-corpus/train.bin gpu-carry/local-corpus/val.bin   # uncompressed, from older versions
    PY="${VENV:-.venv}/bin/python"
    "$PY" - <<'EOF'
import lzma, shutil
from pathlib import Path
src, dst = Path("data/local-corpus"), Path("gpu-carry/local-corpus")
for name in ("train.bin", "val.bin"):
    (dst / (name + ".xz")).write_bytes(lzma.compress((src / name).read_bytes(), preset=6))
shutil.copy(src / "meta.json", dst / "meta.json")
EOF
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d gpu-carry/wheels tqdm
    size=$(tree_and_carry_mib)
    echo "a device call would send ${size} MiB (tree and gpu-carry; the limit is 64 MiB)"
    if awk -v s="$size" -v l="$LIMIT_MIB" 'BEGIN {exit !(s > l)}'; then
      echo "too large for the GPU machine: pack finished results (manifold-muon pack --spectral-summary DIR)," \
        "or carry less" >&2
      exit 1
    fi
    ;;
  first)
    setup_device
    first_stage
    ;;
  bench)
    setup_device
    # The improved solver's cap is gpt2-reduced's (16), so that the table fits one call (128 would
    # take minutes) and its improved rows price the sweep's improved runs.
    "$PYTHON" -m manifold_muon bench --preset gpt2-small --rounds 5 --out "$OUT" --compile --dual_steps=16 "$@"
    ;;
  levers)
    setup_device
    "$PYTHON" benchmarks/fast_path.py --d 768 --layers 12 --rounds 10 --out "$OUT"
    ;;
  sweep)
    setup_device
    case " $* " in *" --data_dir="*) ;; *) setup_corpus ;; esac   # another corpus (the tests' toy one) as given
    modes="${1:?sweep needs MODES, e.g. paper,improved}"
    seeds="${2:?sweep needs SEEDS, e.g. 1,2}"
    shift 2
    allocs=()   # default: the paper's five
    if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then allocs=(--allocations "$1"); shift; fi
    # what is left: config overrides for every run, e.g. --dual_steps=8
    timeout "$BUDGET_S" "$PYTHON" -m manifold_muon sweep --preset gpt2-reduced --modes "$modes" --seeds "$seeds" \
      "${allocs[@]}" --out "$RESULTS" --jobs "$SWEEP_JOBS" --quiet "$@" || echo "sweep stopped (budget ${BUDGET_S}s); finished runs are kept"
    sweep_summary
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
    echo "usage: bash scripts/gpu.sh prepare | first | bench [--key=value ...] | levers | sweep MODES SEEDS [ALLOCATIONS] [--key=value ...] | quality [RUN_DIR ...] | report" >&2
    exit 2
    ;;
esac
