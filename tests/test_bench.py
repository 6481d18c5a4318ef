"""The bench command measures every configuration and reports feasible improved directions."""
from manifold_muon.lab.bench import format_bench, run_bench, save_bench


def test_bench_rows_ratios_and_quality(tmp_path):
    result = run_bench("tiny-cpu", allocations=["unconstrained", "hetero"], rounds=1, warmup=1,
                       overrides={"n_layer": "1", "n_embd": "32", "n_head": "2", "block_size": "16",
                                  "vocab_size": "128", "batch_size": "2"})
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == ["adamw", "torch.optim.AdamW (fused)", "torch.optim.Muon", "muon (ours, newton-schulz)",
                          "muon (ours, polar express)", "hetero [paper]", "hetero [fast]", "hetero [improved]"]
    assert rows["adamw"]["step_ratio_vs_adamw"] == 1.0 == rows["torch.optim.AdamW (fused)"]["step_ratio_vs_fused_adamw"]
    assert all(r["step_ratio_vs_fused_adamw"] > 0 for r in rows.values())
    # torch's fused AdamW: one kernel per parameter group where ours (torch's functional, not fused) runs several
    assert rows["torch.optim.AdamW (fused)"]["optimizer_ops"] < rows["adamw"]["optimizer_ops"]
    # operations per optimizer step: Muon's msign adds to AdamW's, fast mode's solve to Muon's
    ops = {name: r["optimizer_ops"] for name, r in rows.items()}
    assert 0 < ops["adamw"] < ops["muon (ours, polar express)"] < ops["hetero [fast]"] < ops["hetero [paper]"]
    assert all(r["optimizer_ms"] > 0 and r["step_ms"] >= r["optimizer_ms"] for r in rows.values())
    assert rows["muon (ours, polar express)"]["alignment"] > 0.99   # msign of G is Muon's exact optimum
    assert rows["muon (ours, newton-schulz)"]["alignment"] < 0.99   # NS5 does not converge to msign, by design
    assert rows["hetero [improved]"]["violation_max"] < 1e-5 and rows["hetero [fast]"]["violation_max"] < 1e-5
    assert rows["hetero [paper]"]["violation_max"] > rows["hetero [improved]"]["violation_max"]
    hetero = rows["hetero [fast]"]["by_group"]   # per matrix group: hetero is Stiefel attention, DGram MLP
    assert {g: q["manifold"] for g, q in hetero.items() if q["manifold"] != "none"} == {"attention": "stiefel",
                                                                                      "mlp": "dgram"}
    assert max(q["violation_max"] for q in hetero.values()) == rows["hetero [fast]"]["violation_max"]
    assert "mlp        dgram" in format_bench(result)
    # made feasible, the paper direction loses alignment; a feasible one keeps it (at norm 1)
    paper = rows["hetero [paper]"]["by_group"]
    assert all(q["alignment_repaired"] < q["alignment"] for q in paper.values() if q["manifold"] != "none")
    assert all(abs(q["alignment_repaired"] - q["alignment"]) < 5e-3 for q in hetero.values())
    path = save_bench(result, tmp_path)
    assert path.name == f"bench_{result['date']}_tiny-cpu_cpu.json"
    assert "hetero [improved]" in format_bench(result)


def test_bench_modes_are_checked():
    import pytest
    with pytest.raises(ValueError, match="valid choices: paper, fast, improved"):
        run_bench("tiny-cpu", allocations=["hetero"], modes=["exact"], rounds=1)


TINY = {"n_layer": "1", "n_embd": "32", "n_head": "2", "block_size": "16", "vocab_size": "128", "batch_size": "2"}


def test_bench_compiles_the_forward_once_for_every_configuration():
    from torch._dynamo.utils import counters
    counters.clear()
    result = run_bench("tiny-cpu", allocations=["hetero"], modes=["fast"], rounds=1, warmup=1,
                       overrides={**TINY, "compile": "true"}, progress=False)
    assert result["compiled"] is True and result["compile_error"] is None
    assert counters["stats"]["unique_graphs"] == result["compiled_graphs"] == 1   # five models, one graph
    assert "compiled forward" in format_bench(result)
    assert len(result["rows"]) == 6 and all(r["step_ms"] > r["optimizer_ms"] > 0 for r in result["rows"])


def test_bench_times_the_eager_model_when_compiling_fails(monkeypatch, capsys):
    import torch

    def broken(model, **kwargs):
        def forward(*args):
            raise RuntimeError("no compiler here")
        return forward
    monkeypatch.setattr(torch, "compile", broken)
    result = run_bench("tiny-cpu", allocations=["hetero"], modes=["fast"], rounds=1, warmup=1,
                       overrides={**TINY, "compile": "true"}, progress=False)
    assert result["compiled"] is False and "no compiler here" in result["compile_error"]
    assert "torch.compile failed" in capsys.readouterr().out
    assert "eager forward" in format_bench(result) and len(result["rows"]) == 6


def test_bench_times_compiled_twins_of_muon_and_fast_mode_in_the_same_rounds():
    result = run_bench("tiny-cpu", allocations=["unconstrained"], modes=["fast"], rounds=1, warmup=1,
                       overrides={**TINY, "compile_optimizer": "true"}, progress=False)
    rows = {r["config"]: r for r in result["rows"]}
    twin = rows["muon (ours, polar express, compiled)"]
    assert result["compiled_optimizer"] is True and result["optimizer_compile_errors"] == {}
    assert result["overrides"]["compile_optimizer"] == "true"   # the JSON says how it was run
    assert result["optimizer_graphs"] == 4   # one per stack shape of the tiny GPT's Muon matrices
    assert twin["optimizer_ops"] is None and rows["muon (ours, polar express)"]["optimizer_ops"] > 0
    assert twin["alignment"] > 0.99 and twin["optimizer_ms"] > 0   # statistics steps run eager: the same quality
    # ... beside the compiled graph: bf16 emulated eager against the compiler's float32 here
    assert 0 < twin["compiled_alignment_gap_max"] < 0.01
    assert rows["muon (ours, polar express)"]["compiled_alignment_gap_max"] is None
    assert "compiled direction against eager" in format_bench(result)
    line = next(ln for ln in format_bench(result).splitlines() if ln.startswith("muon (ours, polar express, compiled)"))
    assert line.split()[6] == "-"   # opt ops: not counted for a compiled direction
    from manifold_muon.lab.bench import _configs
    labels = [label for label, _, _ in _configs(["hetero"], ["paper", "fast"], compiled_twins=True)]
    assert labels[-3:] == ["hetero [paper]", "hetero [fast]", "hetero [fast, compiled]"]


def _sigterm_at_synchronisation(monkeypatch, n):
    import os
    import signal

    from manifold_muon.lab import bench
    calls = []

    def synchronize_then_term(device):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(bench, "synchronize", synchronize_then_term)


def test_a_bench_stopped_by_sigterm_keeps_the_rounds_it_measured(monkeypatch):
    import signal
    _sigterm_at_synchronisation(monkeypatch, 35)   # inside the third round
    result = run_bench("tiny-cpu", allocations=["unconstrained"], rounds=5, warmup=1, overrides=TINY, progress=False)
    assert result["stopped"] == f"stopped by signal {int(signal.SIGTERM)}"
    # 5 configurations x 3 synchronisations a step: cut in round 3 (the 2nd timed), at its 2nd configuration
    assert result["rounds"] == 2
    assert [r["config"] for r in result["rows"]][:3] == ["adamw", "torch.optim.AdamW (fused)", "torch.optim.Muon"]
    assert all(r["optimizer_ms"] > 0 and r["optimizer_ops"] is None and r["alignment"] is None
               for r in result["rows"])
    assert "cut short (stopped by signal" in format_bench(result)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler is put back


def test_the_bench_command_saves_a_cut_short_table_and_exits_as_timeout_does(monkeypatch, tmp_path, capsys):
    import json

    import pytest

    from manifold_muon.lab.cli import main
    _sigterm_at_synchronisation(monkeypatch, 35)
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--allocations", "unconstrained", "--rounds", "5", "--out", str(tmp_path)]
             + [f"--{k}={v}" for k, v in TINY.items()])
    assert stop.value.code == 124
    saved = json.loads(next(tmp_path.glob("bench_*.json")).read_text())
    assert saved["stopped"] and saved["rounds"] == 1 and "cut short" in capsys.readouterr().out   # 2 warm-up rounds


def test_a_sigterm_after_the_rounds_keeps_the_timings_and_the_extras_already_measured(monkeypatch):
    import signal
    # 5 configurations x 3 synchronisations a step x 2 rounds = 30; then 2 extra steps a
    # configuration (counted, then statistics): the 56th synchronisation is in the fifth's
    _sigterm_at_synchronisation(monkeypatch, 56)
    result = run_bench("tiny-cpu", allocations=["unconstrained"], rounds=1, warmup=1, overrides=TINY, progress=False)
    assert result["stopped"] is None and result["extras_stopped"] == f"stopped by signal {int(signal.SIGTERM)}"
    rows = result["rows"]
    assert result["rounds"] == 1 and len(rows) == 5 and all(r["optimizer_ms"] > 0 for r in rows)
    assert all(r["optimizer_ops"] > 0 for r in rows[:4]) and rows[3]["config"] == "muon (ours, newton-schulz)"
    assert rows[3]["alignment"] is not None and rows[4]["optimizer_ops"] is None and rows[4]["alignment"] is None
    assert "after the rounds: some rows lack counts" in format_bench(result)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_profile_ranks_one_optimizer_step_by_cost():
    result = run_bench("tiny-cpu", allocations=["hetero"], modes=["fast"], rounds=1, warmup=1, overrides=TINY,
                       progress=False, profile_top=3)
    rows = {r["config"]: r for r in result["rows"]}
    for row in rows.values():
        profile = row["profile"]
        assert profile["of"] == "cpu operations" and row["device_busy"] is None   # no kernels on a CPU
        assert len(profile["top"]) == 3 and profile["total_ms"] > 0
        costs = [t["ms"] for t in profile["top"]]
        assert costs == sorted(costs, reverse=True) and costs[0] <= profile["total_ms"]
    # fast mode's solve runs far more operations than AdamW's update
    assert rows["hetero [fast]"]["profile"]["calls"] > 10 * rows["adamw"]["profile"]["calls"]
    assert "profile of one optimizer step" in format_bench(result)
    import pytest
    with pytest.raises(ValueError, match="must be 0 .no profile. or more, got -1"):
        run_bench("tiny-cpu", allocations=["hetero"], rounds=1, profile_top=-1)


def test_a_gpu_profile_totals_the_kernels_as_torch_does_and_says_how_busy_they_kept_the_device():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from manifold_muon.lab.bench import summarize_profile

    def event(key, device_type, count, cpu_us, device_us):
        return SimpleNamespace(key=key, device_type=device_type, count=count, self_cpu_time_total=cpu_us,
                               self_device_time_total=device_us)
    # A CPU operation's own device time is that of the kernels it launched: counted once, as kernels
    events = [event("aten::mm", DeviceType.CPU, 4, 900.0, 1500.0),
              event("sm90_gemm_bf16", DeviceType.CUDA, 4, 0.0, 1500.0),
              event("vectorized_elementwise_kernel", DeviceType.CUDA, 30, 0.0, 500.0)]
    summary = summarize_profile(events, top=1)
    assert summary == {"of": "device kernels", "calls": 34, "total_ms": 2.0,
                       "top": [{"name": "sm90_gemm_bf16", "calls": 4, "ms": 1.5}]}
    assert summarize_profile(events[:1], top=5)["of"] == "cpu operations"
    row = {"config": "hetero [fast]", "optimizer_ms": 8.0, "profile": summary, "device_busy": 0.25}
    assert "34 device kernels, 2.00 ms = 25% of its 8.0 ms" in format_bench({
        "preset": "p", "device": "d", "torch": "t", "tokens_per_step": 1, "rounds": 1,
        "rows": [{**row, "step_ms": 9.0, "step_ratio_vs_adamw": 1.0, "alignment": None, "violation_max": None}]})


def test_a_failing_profiler_costs_its_column_not_the_table(monkeypatch):
    import torch

    def no_profiler(**kwargs):
        raise RuntimeError("CUPTI unavailable")
    monkeypatch.setattr(torch.profiler, "profile", no_profiler)
    result = run_bench("tiny-cpu", allocations=["hetero"], modes=["fast"], rounds=1, warmup=1, overrides=TINY,
                       progress=False, profile_top=3)
    assert all(r["profile"] == {"error": "RuntimeError: CUPTI unavailable"} for r in result["rows"])
    assert all(r["optimizer_ops"] > 0 and r["device_busy"] is None for r in result["rows"])
    assert result["rows"][-1]["alignment"] is not None   # the quality step still ran
    assert "hetero [fast]: the profiler failed (RuntimeError: CUPTI unavailable)" in format_bench(result)
