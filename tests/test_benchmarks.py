"""The benchmark scripts the GPU plan runs (scripts/gpu.sh) work end to end, at toy sizes."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from conftest import VOCAB, refusal

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_direction_quality_on_random_token_momenta(tmp_path):
    run_script("direction_quality.py", "--random-tokens", "tiny-cpu:hetero:2", "--caps", "0,2", "--device", "cpu",
               "--out", str(tmp_path), "--tag", "smoke")
    (path,) = tmp_path.glob("direction_quality_*_smoke_cpu.json")
    rows = json.loads(path.read_text())["rows"]
    settings = {r["setting"] for r in rows}
    assert settings == {"paper (20 steps)", "fast (bf16)", "improved, cap 0", "improved, cap 2"}
    assert {(r["group"], r["manifold"]) for r in rows} == {("attention", "stiefel"), ("mlp", "dgram")}
    for r in rows:
        if r["setting"] != "paper (20 steps)":
            assert r["violation"] < 1e-6 and abs(r["repaired"] - r["alignment"]) < 5e-3, r
        assert 0 < r["of_bound"] <= 1 + 1e-3, r   # a feasible direction cannot beat the certified dual bound


def test_solver_frontier_measures_every_mode_against_a_valid_bound(tmp_path, data_dir):
    out = run_script("solver_frontier.py", "--widths", "32", "--steps", "2", "--synthetic", "12x4",
                     "--data_dir", str(data_dir), "--out", str(tmp_path))
    assert "| fast |" in out
    (path,) = tmp_path.glob("solver_frontier_*_cpu.json")
    rows = json.loads(path.read_text())["rows"]
    assert {r["setting"] for r in rows} == {"fast", "improved, cap 2", "improved, cap 8", "improved, cap 32",
                                           "improved", "improved, warm", "paper"}
    for r in rows:
        assert 0 < r["quality"] <= 1 + 1e-3, r   # feasible directions cannot beat the certified bound
        if r["setting"] == "fast":
            assert r["flops_per_msign"] <= 1.5 and r["decompositions"] == []


def test_direction_quality_refuses_a_malformed_spec(tmp_path):
    message = refusal(ROOT / "benchmarks" / "direction_quality.py", "--random-tokens", "tiny-cpu:hetero",
                      "--out", tmp_path)
    assert "--random-tokens wants PRESET:ALLOCATION:STEPS, got 'tiny-cpu:hetero'" in message


def test_fast_path_times_every_lever(tmp_path):
    run_script("fast_path.py", "--d", "16", "--layers", "1", "--rounds", "1", "--out", str(tmp_path))
    (path,) = tmp_path.glob("fast_path_*_d16_cpu.json")
    rows = json.loads(path.read_text())["rows"]
    assert set(rows) == {"stiefel", "dgram"}
    for levers in rows.values():
        assert len(levers) == 18 and all(v["ms"] > 0 for v in levers.values())
        assert levers["muon msign: newton-schulz 5, bf16"]["vs_muon"] == 1.0


def test_norm_estimate_compares_the_estimates_along_fast_mode_training(tmp_path, data_dir):
    run_script("norm_estimate.py", "--preset", "tiny-cpu", "--set", "n_layer=1", "--set", f"vocab_size={VOCAB}",
               "--set", "n_embd=48", "--set", "block_size=16", "--set", "batch_size=2", "--steps", "2", "--every", "1",
               "--data", str(data_dir), "--out", str(tmp_path), "--tag", "smoke")
    (path,) = tmp_path.glob("norm_estimate_*_smoke_cpu.json")
    rows = json.loads(path.read_text())["rows"]
    assert {r["allocation"] for r in rows} == {"hetero", "all-dgram"}
    assert {r["shape"] for r in rows if r["allocation"] == "hetero"} == {"stiefel 144x48", "stiefel 48x48", "dgram 192x48"}
    for r in rows:
        assert r["matrices"] == (4 if r["shape"].endswith("192x48") else 2)   # 2 steps x the layer's matrices
        if r["estimate"] == "+ residual":
            assert r["max_shortfall"] < 1e-3, r
        else:   # a Ritz value never exceeds the norm, up to float32 rounding
            assert r["max_overshoot"] < 1e-5, r


def test_dgram_scale_shows_the_reference_solver_losing_the_gradient_as_columns_grow(tmp_path):
    run_script("dgram_scale.py", "--scales", "0.3,8", "--shape", "48x16", "--out", str(tmp_path))
    (path,) = tmp_path.glob("dgram_scale_*_48x16_cpu.json")
    rows = {(r["scale"], r["mode"]): r for r in json.loads(path.read_text())["rows"]}
    assert abs(rows[(0.3, "improved")]["alignment"] - rows[(8.0, "improved")]["alignment"]) < 2e-3  # scale-free
    assert max(rows[(s, "improved")]["violation"] for s in (0.3, 8.0)) < 1e-5
    assert rows[(0.3, "paper")]["alignment"] > 0.9 > 0.5 > rows[(8.0, "paper")]["alignment"]


def test_bf16_emulation_times_both_paths_and_refuses_an_unknown_mode(tmp_path):
    run_script("bf16_emulation.py", "--d", "16", "--layers", "1", "--rounds", "1", "--modes", "muon,fast",
               "--out", str(tmp_path))
    (path,) = tmp_path.glob("bf16_emulation_*_d16_cpu.json")
    result = json.loads(path.read_text())
    assert isinstance(result["native_bf16_matmul"], bool)
    assert set(result["rows"]) == {"muon", "fast"}
    assert all(row["native_ms"] > 0 and row["emulated_ms"] > 0 for row in result["rows"].values())
    message = refusal(ROOT / "benchmarks" / "bf16_emulation.py", "--modes", "slow", "--out", tmp_path)
    assert "unknown mode(s) ['slow']; valid choices: muon, fast, paper" in message


def test_sharded_optimizer_times_every_layout_at_every_world_size(tmp_path):
    run_script("sharded_optimizer.py", "--worlds", "1,2", "--layouts", "replicated,fsdp2,hsdp,columns", "--layers", "1",
               "--d", "16", "--steps", "1", "--mode", "fast", "--out", str(tmp_path))
    (path,) = tmp_path.glob("sharded_optimizer_*_replicated-fsdp2-hsdp-columns_fast_cpu.json")
    medians = json.loads(path.read_text())["optimizer_ms_median"]
    assert set(medians) == {"replicated", "fsdp2", "hsdp", "columns"}
    assert all(set(by_world) == {"1", "2"} and min(by_world.values()) > 0 for by_world in medians.values())
    message = refusal(ROOT / "benchmarks" / "sharded_optimizer.py", "--layouts", "replicated,zero3", "--out", tmp_path)
    assert "unknown layout 'zero3'; valid choices: replicated, fsdp2, hsdp, columns" in message


def test_gpu_first_stage_runs_end_to_end_at_toy_sizes(tmp_path):
    # scripts/gpu.sh first is the one prepared call of a short GPU loan: it must not rot here
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_DRY": "1", "FIRST_S": "400"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu.sh"), "first"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "first: stopped or failed" not in done.stdout, done.stdout[-3000:]
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    assert [n.split("_", 2)[0] for n in names] == ["bench", "bench", "bench", "fast", "improved/bench"], names
    precise, tf32, compiled_optimizer = (json.loads(p.read_text()) for p in sorted(
        tmp_path.glob("bench_*.json"), key=lambda p: ("compiled-optimizer" in p.name, "high" in p.name)))
    assert precise["compiled"] and precise["matmul_precision"] == "highest" and tf32["matmul_precision"] == "high"
    assert compiled_optimizer["compiled_optimizer"] and not compiled_optimizer["optimizer_compile_errors"]
    assert compiled_optimizer["compiled_graphs"] == 1 and compiled_optimizer["optimizer_graphs"] == 4
    assert {r["config"] for r in tf32["rows"]} >= {"hetero [fast]", "all-dgram [fast]"}
    for profiled in (precise, compiled_optimizer):   # the kernels of a GPU, the operations of a CPU
        assert all(len(r["profile"]["top"]) == 8 for r in profiled["rows"]), profiled["rows"][0]["profile"]
    assert tf32["rows"][0]["profile"] is None
    summary = done.stdout[done.stdout.index("summary (ms;"):]
    assert "hetero [improved]" in summary and "fast direction + retraction" in summary
    assert "muon (ours, polar express, compiled)" in summary


def test_gpu_sweep_stage_runs_side_by_side_packs_and_measures_quality(data_dir, tmp_path):
    # scripts/gpu.sh sweep is how the GPU study runs; here at toy sizes on the test corpus
    results, out = tmp_path / "results", tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "RESULTS": str(results), "PYTHON": sys.executable, "SWEEP_JOBS": "2",
           "QUALITY_S": "300"}
    toy = [f"--data_dir={data_dir}", f"--vocab_size={VOCAB}", "--n_layer=1", "--n_embd=32", "--n_head=2",
           "--block_size=16", "--batch_size=2", "--max_iters=6", "--warmup_iters=1", "--lr_decay_iters=6",
           "--eval_interval=3", "--eval_iters=1", "--dual_steps=4"]
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu.sh"), "sweep", "paper", "1", "unconstrained,hetero",
                           *toy], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = done.stdout[done.stdout.index("sweep summary (2 runs side by side"):]
    for run in ("unconstrained-paper-s1", "hetero-paper-s1"):
        assert f"{run} " in summary and "completed" in summary and "6/6 it" in summary, summary
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("hetero-paper-s1/summary.json") for n in names)
    assert not any(n.endswith("ckpt.pt") for n in names)   # checkpoints stay on the device
    (quality,) = out.glob("direction_quality_*.json")       # only the constrained run is measured
    assert {r["run"] for r in json.loads(quality.read_text())["rows"]} == {"hetero-paper-s1"}


