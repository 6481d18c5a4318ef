"""The ``compile`` group key: torch.compile'd directions equal the eager ones, and compiling
never costs a step (a failure warns once and runs eager)."""
import pytest
import torch

from manifold_muon import ManifoldMuon
from manifold_muon.optim import optimizer as optimizer_module


def _params(seed=0, shape=(48, 32), count=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for _ in range(count)]


def _stepped(groups_for, steps=3, **options):
    """Parameters after ``steps`` steps with the same gradients; ``groups_for(params)`` makes the groups."""
    params = _params() + _params(seed=1, shape=(32, 32))
    opt = ManifoldMuon(groups_for(params), **options)
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def _fast_and_muon(compile_):
    # float32 msign: the compiled graph and the eager code then do the same arithmetic (a compiled
    # bf16 msign emulated on a CPU without bf16 units keeps float32 where eager rounds to bf16)
    return lambda params: [
        {"params": params[:2], "manifold": "stiefel", "mode": "fast", "compile": compile_, "msign_dtype": "float32"},
        {"params": params[2:], "manifold": "none", "compile": compile_, "msign_dtype": "float32"}]


def test_compiled_fast_and_muon_directions_equal_eager():
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    eager, _ = _stepped(_fast_and_muon(False))
    compiled, opt = _stepped(_fast_and_muon(True))
    assert opt.compile_error is None
    assert counters["stats"]["unique_graphs"] - graphs == 2   # one graph per stack: Stiefel fast, plain Muon
    for a, b in zip(compiled, eager):   # (torch 2.13 miscompiled a concatenating Lanczos by 0.15 here)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_a_failed_compile_warns_once_and_runs_eager(monkeypatch):
    def broken():
        def direction(*args):
            raise RuntimeError("no compiler here")
        return direction
    monkeypatch.setattr(optimizer_module, "_compiled_stack_direction", broken)
    eager, _ = _stepped(_fast_and_muon(False))
    with pytest.warns(RuntimeWarning, match="running eager from now on") as record:
        fallen_back, opt = _stepped(_fast_and_muon(True))
    assert len(record) == 1 and "no compiler here" in opt.compile_error
    for a, b in zip(fallen_back, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_compile_leaves_the_iterative_solvers_and_statistics_steps_eager(monkeypatch):
    calls = []

    def counting():
        def direction(*args):
            calls.append(args[3])   # the mode
            return optimizer_module.stack_direction(*args)
        return direction
    monkeypatch.setattr(optimizer_module, "_compiled_stack_direction", counting)
    for mode in ("paper", "improved"):   # their solves stop on data-dependent tests: eager
        _stepped(lambda params, mode=mode: [{"params": params, "manifold": "stiefel", "mode": mode, "compile": True}],
                 steps=1)
    assert calls == []
    _, opt = _stepped(lambda params: [{"params": params, "manifold": "dgram", "mode": "fast", "compile": True}], steps=1)
    assert calls == ["fast", "fast"]   # two stacks: (48, 32) and (32, 32)
    opt.collect_stats = True   # statistics need the solve's details: eager, and the compiled graph beside it
    opt.step()
    assert calls == ["fast"] * 4 and len(opt.stats) == 4
    assert all(s["compiled_alignment_gap"] == 0.0 for s in opt.stats.values())   # here "compiled" is eager


def test_statistics_steps_measure_the_compiled_directions_gap_from_eager(monkeypatch):
    def miscompiled():   # what a compiler bug looks like: a wrong direction, no error
        return lambda *args: 2 * optimizer_module.stack_direction(*args)
    _, opt = _stepped(_fast_and_muon(True), steps=1)
    opt.collect_stats = True
    opt.step()
    assert all(abs(s["compiled_alignment_gap"]) < 1e-6 for s in opt.stats.values())   # float32: the same
    monkeypatch.setattr(optimizer_module, "_compiled_stack_direction", miscompiled)
    opt.step()   # twice the direction: twice the alignment
    assert all(abs(s["compiled_alignment_gap"] - s["alignment"]) < 1e-6 for s in opt.stats.values())


def test_compile_must_be_a_bool():
    with pytest.raises(ValueError, match="unknown compile 'yes'; valid choices: False, True"):
        ManifoldMuon(_params(), compile="yes")


def test_a_compiled_direction_is_one_graph_even_as_the_process_first_use_of_its_constants():
    """The start block and the bf16 probe are compile-time constants (marked when the library
    first compiles): unmarked, a process whose first fast step was compiled got 13 graphs instead of one."""
    from torch._dynamo.utils import counters
    from manifold_muon.optim import norms, precision
    norms._lanczos_starts.clear()   # as in a fresh process: nothing made eagerly yet
    precision._probe_bf16_units.cache_clear()
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    params = _params(seed=2, shape=(40, 24))   # a shape of its own: a new graph, bf16 msign (the default)
    opt = ManifoldMuon([{"params": params, "manifold": "stiefel", "mode": "fast", "compile": True}])
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        opt.step()
    assert opt.compile_error is None
    assert counters["stats"]["unique_graphs"] - graphs == 1 and sum(counters["graph_break"].values()) == breaks


def test_importing_the_library_leaves_the_compiler_unloaded():
    # torch._dynamo took about 2 s of a 4.6 s import here; only compiling should pay it
    import subprocess
    import sys
    code = "import sys, manifold_muon, manifold_muon.lab.cli, manifold_muon.lab.train; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
