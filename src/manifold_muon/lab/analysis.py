"""Analyses of finished runs: time series read back from a run directory, the causal chain of
an instability, and whether a gap between two allocations exceeds the seed-to-seed spread.

Everything here is a pure function of the files a run wrote (``eval.jsonl``,
``diagnostics.jsonl``, ``spectral.bin``, ``events.jsonl``), so it can be re-run on old runs.
"""
from __future__ import annotations

import statistics

import numpy as np

from .diagnostics import read_spectral
from .runio import read_jsonl

__all__ = ["val_curve", "sigma_max_curve", "mechanism_curve", "mechanism_peaks", "health_curve", "first_crossing", "causal_chain",
           "divergence_iter", "baseline", "CHAIN", "CHAIN_SIGNALS", "CHAIN_LABELS", "seed_gap", "GAP_PAIRS",
           "finite_values"]

Series = tuple[np.ndarray, np.ndarray]

# ---- time series -------------------------------------------------------------------------------


def val_curve(run_dir) -> Series | None:
    evals = read_jsonl(run_dir / "eval.jsonl")
    if not evals:
        return None
    return np.array([e["iter"] for e in evals]), np.array([e["val_loss"] for e in evals], dtype=float)


def sigma_max_curve(run_dir, group: str) -> Series | None:
    """The largest singular value over the group's matrices (attention or mlp), per record."""
    header, rec = read_spectral(run_dir)
    if header is None or not len(rec):
        return None
    idx = [i for i, g in enumerate(header["groups"]) if g == group]
    if not idx:
        return None
    return rec["iter"], np.max(np.stack([rec[f"sv{i}"][:, 0] for i in idx]), axis=0).astype(float)


def mechanism_curve(run_dir, key: str, reduce=max) -> Series | None:
    """A mechanism diagnostic (``logit_max_abs``, ``entropy``, ``jacobian_fro`` ...) reduced over layers."""
    rows = [d for d in read_jsonl(run_dir / "diagnostics.jsonl") if d.get("mechanics")]
    if not rows:
        return None
    return (np.array([d["iter"] for d in rows]),
            np.array([reduce([m[key] for m in d["mechanics"]]) for d in rows], dtype=float))


def mechanism_peaks(run_dir) -> dict:
    """How far one run went along the paper's mechanism: the largest attention sigma_max, the
    largest attention logit (max over layers) and the lowest attention entropy (min over layers)."""
    def extreme(series, pick):
        if series is None:
            return None
        finite = series[1][np.isfinite(series[1])]
        return float(pick(finite)) if len(finite) else None
    return {"sigma_max": extreme(sigma_max_curve(run_dir, "attention"), np.max),
            "logit": extreme(mechanism_curve(run_dir, "logit_max_abs", max), np.max),
            "entropy": extreme(mechanism_curve(run_dir, "entropy", min), np.min)}


def health_curve(run_dir, group: str, key: str) -> Series | None:
    """An optimizer health statistic of a group (``alignment_mean``, ``violation_end_max``,
    ``momentum_norm_max`` ...) over training; None where the group has no manifold or the run's
    log lacks the statistic."""
    rows = [d for d in read_jsonl(run_dir / "diagnostics.jsonl")
            if group in (d.get("health") or {}) and d["health"][group]["manifold"] not in ("none", None)
            and key in d["health"][group]]   # runs logged before a statistic existed lack it
    if not rows:
        return None
    return np.array([d["iter"] for d in rows]), np.array([d["health"][group][key] for d in rows], dtype=float)


# ---- the causal chain ----------------------------------------------------------------------------

#: The chain the paper proposes: spectral growth -> logit inflation -> entropy collapse ->
#: Jacobian collapse -> divergence.
CHAIN = ("sigma_max", "logit_scale", "entropy", "jacobian", "divergence")
CHAIN_LABELS = {"sigma_max": "attention sigma_max x1.41", "logit_scale": "logit max|z| x2",
                "entropy": "entropy /2", "jacobian": "softmax Jacobian /2", "divergence": "divergence"}


#: A stage's onset is its signal moving by ``factor ** exponent``.  A logit is ``q . k`` with
#: ``q`` and ``k`` both made by the attention matrices, so its bound grows as sigma_max
#: squared: sigma_max growing by sqrt(factor) is what lets the logits grow by ``factor``.  With
#: the same factor for both, the logits would cross first by construction.
ONSET_EXPONENT = {"sigma_max": 0.5}

#: The signal of each stage before divergence, and whether its onset is a rise (else a fall).
CHAIN_SIGNALS = {
    "sigma_max": (lambda run_dir: sigma_max_curve(run_dir, "attention"), True),          # max over matrices
    "logit_scale": (lambda run_dir: mechanism_curve(run_dir, "logit_max_abs", max), True),  # max over layers
    "entropy": (lambda run_dir: mechanism_curve(run_dir, "entropy", min), False),          # min over layers
    "jacobian": (lambda run_dir: mechanism_curve(run_dir, "jacobian_fro", min), False),    # min over layers
}


def baseline(series: Series | None, start_iter: int) -> float | None:
    """The first value at or after ``start_iter`` (None if there is none)."""
    if series is None or not (series[0] >= start_iter).any():
        return None
    return float(series[1][series[0] >= start_iter][0])


def _from_baseline(series: Series | None, start_iter: int) -> tuple[float, np.ndarray, np.ndarray] | None:
    """``(baseline, iters, values)`` from ``start_iter`` on; None without a finite positive baseline."""
    base = baseline(series, start_iter)
    if base is None or not np.isfinite(base) or base <= 0:
        return None
    keep = series[0] >= start_iter
    return base, series[0][keep], series[1][keep]


def first_crossing(series: Series | None, *, start_iter: int, factor: float, rising: bool) -> int | None:
    """First iteration at or after ``start_iter`` where the value reaches ``factor`` times its
    :func:`baseline` (``rising``) or falls to ``1/factor`` of it.  None if it never does (or
    there is no data)."""
    found = _from_baseline(series, start_iter)
    if found is None:
        return None
    base, iters, values = found
    hit = values >= factor * base if rising else values <= base / factor
    hit |= ~np.isfinite(values)  # a non-finite diagnostic has certainly crossed
    return int(iters[np.argmax(hit)]) if hit.any() else None


def causal_chain(run_dir, *, start_iter: int, divergence_iter: int | None, factor: float = 2.0) -> dict:
    """Onset iteration of each stage of :data:`CHAIN` in one run, and whether the stages that
    happened did so in the chain's order (ties allowed: the diagnostics are sampled every
    ``diag_interval`` iterations, so two stages can fall into one interval).

    Onsets are measured against the run's own values at ``start_iter`` (the end of warmup):
    the logit scale (max over layers) rising by ``factor``, sigma_max (max over attention
    matrices) rising by ``sqrt(factor)`` (:data:`ONSET_EXPONENT`), attention entropy and the
    softmax-Jacobian norm (min over layers) falling by ``factor`` (:data:`CHAIN_SIGNALS`);
    divergence is ``divergence_iter`` (the classifier's, or the first non-finite step)."""
    onsets, peaks = {}, {}
    for stage, (load, rising) in CHAIN_SIGNALS.items():
        series = load(run_dir)
        onsets[stage] = first_crossing(series, start_iter=start_iter, factor=factor ** ONSET_EXPONENT.get(stage, 1.0),
                                       rising=rising)
        peaks[stage] = peak_ratio(series, start_iter=start_iter, rising=rising)
    onsets["divergence"] = divergence_iter
    reached = [onsets[s] for s in CHAIN if onsets[s] is not None]
    return {"onsets": onsets, "peaks": peaks, "reached": len(reached),
            "in_order": all(a <= b for a, b in zip(reached, reached[1:]))}


def peak_ratio(series: Series | None, *, start_iter: int, rising: bool) -> float | None:
    """How far the signal went from its :func:`baseline`: the largest ``value / baseline``
    (``rising``) or ``baseline / value`` after ``start_iter``, ignoring non-finite values."""
    found = _from_baseline(series, start_iter)
    if found is None:
        return None
    base, _, values = found
    values = values[np.isfinite(values)]
    ratios = values / base if rising else base / np.maximum(values, np.finfo(float).tiny)
    return float(ratios.max()) if len(ratios) else None


def divergence_iter(run_dir, verdict: dict) -> int | None:
    """Where a run diverged: the first non-finite step or the classifier's iteration, if any."""
    nonfinite = [e["iter"] for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") == "nonfinite"]
    candidates = nonfinite[:1] + ([verdict["criterion_iter"]] if not verdict["stable"] else [])
    return min(candidates) if candidates else None


# ---- significance --------------------------------------------------------------------------------

#: Allocation pairs whose gap the report tests: the paper's ordering, and scale control.
GAP_PAIRS = (("hetero", "all-stiefel"), ("all-stiefel", "unconstrained"), ("hetero", "unconstrained"),
             ("all-dgram-capped", "all-dgram"), ("hetero-inv-capped", "hetero-inv"),
             ("all-dgram-cap2", "all-dgram"), ("hetero-inv-cap2", "hetero-inv"),
             ("all-dgram-cap2", "all-dgram-capped"), ("hetero-inv-cap2", "hetero-inv-capped"),
             ("all-dgram-decay", "all-dgram"), ("hetero-inv-decay", "hetero-inv"),
             ("all-dgram-decay", "all-dgram-capped"), ("hetero-inv-decay", "hetero-inv-capped"),
             ("all-dgram-decay", "all-dgram-cap2"), ("hetero-inv-decay", "hetero-inv-cap2"),
             ("all-dgram-wd", "all-dgram"), ("hetero-inv-wd", "hetero-inv"),
             ("all-dgram-wd", "all-dgram-decay"), ("hetero-inv-wd", "hetero-inv-decay"),
             ("all-dgram-wd", "unconstrained"), ("hetero-inv-wd", "hetero"),
             ("hetero-wd", "hetero"), ("hetero-wd", "all-dgram-wd"), ("hetero-wd", "unconstrained"),
             ("unconstrained-no-wd", "unconstrained"), ("unconstrained-no-wd", "all-dgram"),
             ("hetero-muon", "unconstrained"), ("hetero-muon", "hetero-wd"), ("hetero-muon", "hetero"))


def finite_values(values) -> list[float]:
    """The values that are neither None nor NaN/inf (a diverged run's loss, a missing statistic)."""
    return [v for v in values if v is not None and np.isfinite(v)]


def seed_gap(a: list[float], b: list[float]) -> dict | None:
    """Is the difference of means between two allocations larger than the seed-to-seed spread?

    ``spread`` is the larger of the two ranges (max - min over seeds); ``exceeds_spread`` is
    ``|mean(a) - mean(b)| > spread``; ``separated`` means every seed of one is below every
    seed of the other.  Needs two finite values on each side (None otherwise)."""
    a, b = finite_values(a), finite_values(b)
    if len(a) < 2 or len(b) < 2:
        return None
    gap = statistics.mean(a) - statistics.mean(b)
    spread = max(max(a) - min(a), max(b) - min(b))
    return {"n_a": len(a), "n_b": len(b), "mean_a": statistics.mean(a), "mean_b": statistics.mean(b),
            "std_a": statistics.stdev(a), "std_b": statistics.stdev(b), "gap": gap, "spread": spread,
            "exceeds_spread": abs(gap) > spread, "separated": max(a) < min(b) or max(b) < min(a)}
