"""The statistics the reports state: differences of means with Welch confidence intervals, a
verdict that says "inconclusive" when the interval contains zero, and the smallest difference a
comparison could have detected.

Seeds are few (2-3 a cell), so intervals are wide; that is the honest answer, and the reports
say so rather than reading non-overlapping seed ranges as a difference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["Difference", "welch_difference", "mean_interval", "min_detectable_difference", "format_difference"]


@dataclass(frozen=True)
class Difference:
    """``mean(a) - mean(b)`` with its ``confidence`` interval (Welch's t), Welch's two-sided
    p-value and degrees of freedom, and the sample sizes.  ``low``/``high`` are NaN where a side
    has fewer than two values or both sides have no spread."""

    estimate: float
    low: float
    high: float
    p_value: float
    df: float
    n_a: int
    n_b: int
    confidence: float = 0.95

    @property
    def conclusive(self) -> bool:
        """The interval excludes zero."""
        return math.isfinite(self.low) and (self.low > 0 or self.high < 0)

    @property
    def verdict(self) -> str:
        if not math.isfinite(self.low):
            return "no interval (fewer than 2 seeds a side)"
        if not self.conclusive:
            return "inconclusive"
        return "a lower" if self.high < 0 else "a higher"


def welch_difference(a, b, confidence: float = 0.95) -> Difference:
    """Welch's interval for ``mean(a) - mean(b)`` (unequal variances)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    estimate = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    nan = Difference(estimate, math.nan, math.nan, math.nan, math.nan, len(a), len(b), confidence)
    if len(a) < 2 or len(b) < 2:
        return nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return nan
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    p_value = 2 * stats.t.sf(abs(estimate) / se, df)
    return Difference(estimate, estimate - half, estimate + half, float(p_value), float(df), len(a), len(b), confidence)


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """The mean and the half-width of its t interval (NaN with fewer than two values)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan), math.nan
    return float(x.mean()), float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def min_detectable_difference(sd: float, n_a: int, n_b: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true difference a two-sided two-sample t test at level ``alpha`` detects with
    probability ``power``, for seeds of standard deviation ``sd`` (the noncentral t, solved
    numerically).  NaN with fewer than two seeds a side."""
    if n_a < 2 or n_b < 2 or not math.isfinite(sd):
        return math.nan
    df = n_a + n_b - 2
    scale = sd * math.sqrt(1 / n_a + 1 / n_b)
    critical = stats.t.ppf(1 - alpha / 2, df)

    def achieved(delta: float) -> float:
        nc = delta / scale
        return stats.nct.sf(critical, df, nc) + stats.nct.cdf(-critical, df, nc)

    low, high = 0.0, scale
    while achieved(high) < power:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if achieved(mid) < power else (low, mid)
    return high


def format_difference(d: Difference, digits: int = 3) -> str:
    """``-0.061 [-0.112, -0.010]`` or ``-0.061 [-0.30, 0.18], inconclusive``."""
    if not math.isfinite(d.low):
        return f"{d.estimate:+.{digits}f} (no interval: fewer than 2 seeds a side)"
    text = f"{d.estimate:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"
    return text if d.conclusive else text + ", inconclusive"
