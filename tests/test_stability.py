"""Each criterion fires when it should and stays silent when it should not."""
import math

import pytest

from manifold_muon.lab.stability import classify_stability


def curve(values, every=100):
    return [(i * every, v) for i, v in enumerate(values)]


SMOOTH = [10.0, 6.0, 5.0, 4.5, 4.2, 4.0, 3.9, 3.85, 3.82, 3.8, 3.79]


def classify(values, **kw):
    return classify_stability(curve(values), warmup_iters=kw.pop("warmup_iters", 100), max_iters=1000, **kw)


def test_a_smooth_curve_and_small_wiggles_are_stable():
    assert classify(SMOOTH).stable
    wiggly = SMOOTH[:6] + [4.05, 3.95, 4.02, 3.93, 3.95]  # within every threshold
    assert classify(wiggly).stable


def test_hard_spike_fires_after_warmup_only():
    spiky = SMOOTH[:5] + [5.3] + [4.1, 4.0, 3.9, 3.85, 3.84]  # 4.2 -> 5.3: +1.1, then recovers
    v = classify(spiky)
    assert (v.stable, v.criterion, v.iteration) == (False, "hard_spike", 500)
    early = [10.0, 6.0, 7.2] + SMOOTH[3:]                   # +1.2, but during warmup
    assert classify(early, warmup_iters=250).stable
    assert classify(spiky, spike=1.5).stable               # threshold is configurable


def test_persistent_drift_fires_on_a_slow_climb_at_the_end():
    drifting = SMOOTH[:8] + [3.9, 3.95, 4.0]  # best 3.85; last 10% = 2 evals, mean 3.975 > 3.95
    v = classify(drifting)
    assert (v.criterion, v.iteration) == ("persistent_drift", 900)
    assert classify(drifting, drift=0.25).stable


def test_no_recovery_fires_when_a_rise_never_comes_back():
    # rises 0.6 above best at 700 and stays 0.3 above it: no spike (< 1.0), no recovery
    stuck = SMOOTH[:6] + [4.1, 4.6, 4.35, 4.3, 4.3]
    v = classify(stuck, drift=10)
    assert (v.criterion, v.iteration) == ("no_recovery", 700)
    recovered = SMOOTH[:6] + [4.1, 4.6, 4.2, 4.05, 4.0]      # back within 0.1 of best (4.0)
    assert classify(recovered, drift=10).stable


def test_early_termination_on_nonfinite_or_stop_before_the_end():
    v = classify(SMOOTH[:5] + [math.nan])
    assert (v.criterion, v.iteration) == ("early_termination", 500)
    v = classify_stability(curve(SMOOTH[:6]), warmup_iters=100, max_iters=1000, stopped_at=537)
    assert (v.criterion, v.iteration) == ("early_termination", 537)
    assert classify_stability(curve(SMOOTH), warmup_iters=100, max_iters=1000, stopped_at=1000).stable


def test_first_criterion_wins_and_all_are_listed():
    diverged = SMOOTH[:4] + [6.0, 7.0, 8.0, 9.0, 9.5, 9.8, 10.0]
    v = classify(diverged)
    assert v.criterion == "hard_spike" and v.iteration == 400
    assert {c for c, _ in v.fired} == {"hard_spike", "no_recovery", "persistent_drift"}
    assert "unstable: hard_spike at iteration 400" == v.describe()


def test_unknown_threshold_names_the_valid_ones():
    with pytest.raises(ValueError, match="spike, drift, drift_window, rise, recover"):
        classify(SMOOTH, spikes=2.0)
