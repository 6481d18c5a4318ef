"""Long work shows its progress: sweeps by training step across the runs in flight, and train
says how many CPU threads it takes."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from manifold_muon.lab import cli
from manifold_muon.lab.sweep import _StepProgress


class Bar:
    def __init__(self):
        self.n, self.postfix = 0, ""

    def update(self, k):
        self.n += k

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text


def test_sweep_progress_moves_with_each_runs_logged_steps(tmp_path):
    a, b = tmp_path / "a-s1", tmp_path / "b-s1"
    a.mkdir(), b.mkdir()
    bar = Bar()
    progress = _StepProgress({str(a): 10, str(b): 10}, bar)
    (a / "metrics.jsonl").write_text('{"iter": 0}\n{"iter": 1}\n{"iter": 2}\n')
    progress.poll()
    assert bar.n == 3 and "running: a-s1" in bar.postfix
    with open(a / "metrics.jsonl", "a") as f:
        f.write('{"iter": 3}\n')
    (b / "metrics.jsonl").write_text('{"iter": 0}\n')
    progress.poll()
    assert bar.n == 5   # only the new lines count
    progress.finished("a-s1", ok=True)   # a resumed run logs only its remaining steps: the rest is credited
    assert bar.n == 11 and "1/2 runs done" not in bar.postfix
    progress.poll()
    assert "1/2 runs done" in bar.postfix


def test_train_takes_its_share_of_the_cores_and_says_so(monkeypatch, capsys):
    cfg = SimpleNamespace(torch_device=lambda: torch.device("cpu"))
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 8)
    try:
        cli._set_cpu_threads(cfg, None, quiet=False)
        assert torch.get_num_threads() == 4 and "CPU threads: 4" in capsys.readouterr().out
        monkeypatch.setenv("OMP_NUM_THREADS", "3")   # as a sweep sets it for its runs
        cli._set_cpu_threads(cfg, None, quiet=True)
        assert torch.get_num_threads() == 3
        cli._set_cpu_threads(cfg, 1, quiet=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
