"""The report's analyses: onset detection, the causal chain on a synthetic run, the seed-gap test."""
import json

import numpy as np
import pytest
import torch

from manifold_muon.lab.analysis import causal_chain, divergence_iter, first_crossing, seed_gap
from manifold_muon.lab.diagnostics import SpectralRecorder


def test_first_crossing_is_measured_from_the_baseline_after_start():
    it = np.arange(0, 100, 10)
    rising = (it, np.array([5.0, 1.0, 1.2, 1.5, 1.9, 2.1, 3.0, 1.0, 1.0, 1.0]))
    assert first_crossing(rising, start_iter=10, factor=2.0, rising=True) == 50   # 2.1 >= 2 x 1.0; iter 0 ignored
    assert first_crossing(rising, start_iter=10, factor=4.0, rising=True) is None
    falling = (it, np.array([1.0, 4.0, 3.0, 2.5, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    assert first_crossing(falling, start_iter=10, factor=2.0, rising=False) == 40
    nan = (it, np.array([1.0, 1.0, 1.1, np.nan, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    assert first_crossing(nan, start_iter=0, factor=2.0, rising=True) == 30
    assert first_crossing(None, start_iter=0, factor=2.0, rising=True) is None
    assert first_crossing(rising, start_iter=1000, factor=2.0, rising=True) is None


def _synthetic_run(run_dir, *, sigma_at, logit_at, entropy_at, jacobian_at, nonfinite_at=None, sigma_growth=3.0):
    """A run directory whose diagnostics step from baseline to 3x (or 1/3; sigma_max to
    ``sigma_growth`` x) at the given iterations."""
    run_dir.mkdir()
    iters = list(range(0, 200, 10))
    w = {"transformer.h.0.attn.c_attn.weight": torch.eye(12, 4)}
    rec = SpectralRecorder(run_dir, w)
    with open(run_dir / "diagnostics.jsonl", "w") as f:
        for it in iters:
            rec.record(it, {k: v * (sigma_growth if it >= sigma_at else 1.0) for k, v in w.items()})
            mech = {"layer": 0, "logit_max_abs": 3.0 if it >= logit_at else 1.0,
                    "entropy": 1 / 3 if it >= entropy_at else 1.0, "jacobian_fro": 1 / 3 if it >= jacobian_at else 1.0}
            f.write(json.dumps({"iter": it, "mechanics": [mech, {**mech, "layer": 1}], "health": {}}) + "\n")
    events = [{"iter": nonfinite_at, "event": "nonfinite"}] if nonfinite_at is not None else []
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run_dir


def test_causal_chain_finds_each_onset_and_checks_the_order(tmp_path):
    run = _synthetic_run(tmp_path / "a", sigma_at=50, logit_at=70, entropy_at=70, jacobian_at=90, nonfinite_at=130)
    verdict = {"stable": False, "criterion_iter": 140}
    div = divergence_iter(run, verdict)
    assert div == 130  # the first non-finite step comes before the classifier's verdict
    chain = causal_chain(run, start_iter=20, divergence_iter=div)
    assert chain["onsets"] == {"sigma_max": 50, "logit_scale": 70, "entropy": 70, "jacobian": 90, "divergence": 130}
    assert chain["in_order"] and chain["reached"] == 5
    assert chain["peaks"] == pytest.approx({"sigma_max": 3.0, "logit_scale": 3.0, "entropy": 3.0, "jacobian": 3.0})

    backwards = _synthetic_run(tmp_path / "b", sigma_at=120, logit_at=60, entropy_at=1000, jacobian_at=1000)
    chain = causal_chain(backwards, start_iter=20, divergence_iter=divergence_iter(backwards, {"stable": True}))
    assert chain["onsets"]["entropy"] is None and chain["onsets"]["divergence"] is None
    assert chain["reached"] == 2 and not chain["in_order"]  # logits inflated before sigma_max grew

    # sigma_max x1.5 (x2.25 on the logit bound): an onset; x1.3 (x1.69) is not
    onset = _synthetic_run(tmp_path / "c", sigma_at=40, logit_at=60, entropy_at=1000, jacobian_at=1000, sigma_growth=1.5)
    assert causal_chain(onset, start_iter=20, divergence_iter=None)["onsets"]["sigma_max"] == 40
    short = _synthetic_run(tmp_path / "d", sigma_at=40, logit_at=60, entropy_at=1000, jacobian_at=1000, sigma_growth=1.3)
    assert causal_chain(short, start_iter=20, divergence_iter=None)["onsets"]["sigma_max"] is None


def test_seed_gap_compares_the_gap_with_the_spread():
    clear = seed_gap([3.00, 3.01, 3.02], [3.10, 3.12])
    assert clear["gap"] == pytest.approx(3.01 - 3.11) and clear["spread"] == pytest.approx(0.02)
    assert clear["exceeds_spread"] and clear["separated"]
    noisy = seed_gap([3.00, 3.10], [3.04, 3.08])
    assert noisy["spread"] == pytest.approx(0.10) and not noisy["exceeds_spread"] and not noisy["separated"]
    assert seed_gap([3.0], [3.1, 3.2]) is None
    assert seed_gap([3.0, float("nan"), None], [3.1, 3.2]) is None  # a diverged seed leaves one finite value
