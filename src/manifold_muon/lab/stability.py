"""The instability classifier: a pure function of the validation curve.

The paper does not give its thresholds; these are ours, all configurable:

1. ``hard_spike``: after warmup, a val loss above best-so-far + ``spike`` (1.0).
2. ``persistent_drift``: the mean val loss over the final ``drift_window`` (10%) of
   evaluations is above the best + ``drift`` (0.1).
3. ``no_recovery``: once the val loss rises ``rise`` (0.5) above best-so-far, it never comes
   back within ``recover`` (0.1) of that best.
4. ``early_termination``: a non-finite val loss, or the run stopped (``stopped_at``) before
   ``max_iters``, e.g. after consecutive non-finite steps.

The verdict names the criterion that fired first (by iteration) and lists all that fired.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["classify_stability", "Verdict", "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = dict(spike=1.0, drift=0.1, drift_window=0.1, rise=0.5, recover=0.1)


@dataclass(frozen=True)
class Verdict:
    stable: bool
    criterion: str | None = None          # the first criterion to fire
    iteration: int | None = None          # ... and where
    fired: tuple = field(default=())      # every (criterion, iteration) that fired

    def describe(self) -> str:
        return "stable" if self.stable else f"unstable: {self.criterion} at iteration {self.iteration}"


def classify_stability(evals, *, warmup_iters: int, max_iters: int, stopped_at: int | None = None,
                       **thresholds) -> Verdict:
    """Classify a run from ``evals``, a list of ``(iteration, val_loss)`` in iteration order.

    ``stopped_at``: the iteration the run ended at, if it ended before ``max_iters``.
    Threshold keywords override :data:`DEFAULT_THRESHOLDS`.
    """
    unknown = set(thresholds) - set(DEFAULT_THRESHOLDS)
    if unknown:
        raise ValueError(f"unknown threshold(s) {sorted(unknown)}; valid choices: {', '.join(DEFAULT_THRESHOLDS)}")
    t = {**DEFAULT_THRESHOLDS, **thresholds}
    evals = [(int(i), float(v)) for i, v in evals]
    fired = []

    nonfinite = next((i for i, v in evals if not math.isfinite(v)), None)
    if nonfinite is not None:
        fired.append(("early_termination", nonfinite))
    elif stopped_at is not None and stopped_at < max_iters:
        fired.append(("early_termination", stopped_at))
    finite = [(i, v) for i, v in evals if math.isfinite(v)]

    best = math.inf
    rise_at, rise_best = None, None
    for i, v in finite:
        if i > warmup_iters and v > best + t["spike"] and not any(c == "hard_spike" for c, _ in fired):
            fired.append(("hard_spike", i))
        if rise_at is None and v > best + t["rise"]:
            rise_at, rise_best = i, best
        best = min(best, v)
    if rise_at is not None and not any(v <= rise_best + t["recover"] for i, v in finite if i > rise_at):
        fired.append(("no_recovery", rise_at))

    if finite:
        window = finite[-max(1, math.ceil(t["drift_window"] * len(finite))):]
        if sum(v for _, v in window) / len(window) > best + t["drift"]:
            fired.append(("persistent_drift", window[0][0]))

    if not fired:
        return Verdict(True)
    first = min(fired, key=lambda c: c[1])
    return Verdict(False, first[0], first[1], tuple(sorted(fired, key=lambda c: c[1])))
