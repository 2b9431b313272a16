"""The report's statistics: group intervals inside a metric's range, paired tests against a baseline, Holm.

Pure functions over numbers (numpy and scipy only), so the null simulation in tests/test_stats.py runs the
exact code the report runs. docs/statistics.md explains the choices.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

CONFIDENCE = 0.95
ALPHA = 0.05
MIN_SEEDS = 5  # fewer matched seeds than this: never called significant, whatever the p-value
MIN_DISTINCT = 3  # distinct |differences| the paired t needs; fewer (ties, a constant step): exact test
EXACT_MAX_N = 16  # up to 2^16 sign vectors enumerated; above, a seeded Monte Carlo sample of them
RESAMPLES = 20_000
POWER = 0.8

# Range of each metric (by its name after the stage prefix); differences live in [lo - hi, hi - lo].
UNIT = (0.0, 1.0)
RANGES = {"accuracy": UNIT, "balanced_accuracy": UNIT, "macro_f1": UNIT, "micro_f1": UNIT, "map": UNIT,
          "minority_recall": UNIT, "exact_match": UNIT, "hamming_loss": UNIT, "ece": UNIT,
          "brier": (0.0, 2.0), "nll": (0.0, math.inf)}
CLASS_METRIC = re.compile(r"^(recall|precision|f1)_class_\d+$")


def metric_range(key: str) -> tuple[float, float]:
    """(low, high) a metric can take, from its name (`test/ece` → (0, 1)); unbounded when unknown."""
    name = key.rpartition("/")[2]
    if name in RANGES:
        return RANGES[name]
    if CLASS_METRIC.match(name):
        return UNIT
    return (-math.inf, math.inf)


def difference_range(key: str) -> tuple[float, float]:
    """(low, high) a difference of two values of the metric can take."""
    low, high = metric_range(key)
    return (low - high, high - low)


@dataclass(frozen=True)
class Summary:
    """Mean, 95% interval [low, high] (Student t, clipped to the metric's range), sample std and count."""

    mean: float
    low: float
    high: float
    std: float
    n: int

    @property
    def half_width(self) -> float:
        """The unclipped t half-width t_{0.975, n-1} · s / √n (NaN for fewer than two values)."""
        return t_half_width(self.std, self.n)

    def text(self, digits: int = 3) -> str:
        """`mean [low, high]`; one value alone, or values all equal, say so instead of an empty interval."""
        if self.n == 0:
            return "—"
        if self.n == 1:
            return f"{self.mean:.{digits}f} (1 run)"
        if self.std == 0:
            return f"{self.mean:.{digits}f} (all {self.n} equal)"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


NO_RUNS = Summary(math.nan, math.nan, math.nan, math.nan, 0)  # a metric no run recorded


def t_half_width(std: float, n: int) -> float:
    """t_{0.975, n-1} · s / √n, NaN for n < 2."""
    if n < 2:
        return math.nan
    # scipy.special's t quantile, not stats.t.ppf: the same number ~100x faster (the null simulation runs
    # this thousands of times).
    return float(special.stdtrit(n - 1, 0.5 + CONFIDENCE / 2)) * std / math.sqrt(n)


def summarize(values, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Summary:
    """Mean and the Student t interval mean ± t_{0.975, n-1} · s / √n over the finite `values`, clipped to
    `bounds` (the metric's range: a recall's interval never leaves [0, 1]). s is the sample std (ddof=1).

    Clipping keeps the interval's coverage where the truth can lie and is the plainest honest choice for a
    mean over seeds, whose per-run sample counts the report does not know (so Wilson's interval for a
    binomial proportion does not apply). One value gives a NaN interval.
    """
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return NO_RUNS
    mean = float(values.mean())
    if n < 2:
        return Summary(mean, math.nan, math.nan, math.nan, 1)
    std = float(values.std(ddof=1))
    if std <= 1e-12 * max(1.0, abs(mean)):
        std = 0.0  # equal values whose mean rounded: no spread, not a spread of 1e-17
    half = t_half_width(std, n)
    return Summary(mean, max(bounds[0], mean - half), min(bounds[1], mean + half), std, n)


def sign_flip_p(diffs) -> float:
    """Two-sided p of the exact paired permutation (sign-flip) test of mean(d) = 0.

    Under the null the two runs of a seed are exchangeable, so each difference's sign is a fair coin:
    p = #{s ∈ {±1}^n : |Σ s_i d_i| ≥ |Σ d_i|} / 2^n, enumerated for n ≤ 16 and estimated from 20 000
    seeded random sign vectors above (as (1 + hits) / (1 + draws)). Valid at any n and for discrete
    metrics; its smallest value is 2 / 2^n (0.25 at n = 3), so a constant difference over few seeds is
    never significant on its own.
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return math.nan
    observed = abs(d.sum())
    tolerance = 1e-9 * max(np.abs(d).sum(), 1e-300)  # equal sums that differ only by rounding count as ties
    if n <= EXACT_MAX_N:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ d) >= observed - tolerance))
    rng = np.random.default_rng(0)
    signs = rng.choice((-1.0, 1.0), size=(RESAMPLES, n))
    hits = np.sum(np.abs(signs @ d) >= observed - tolerance)
    return float((1 + hits) / (1 + RESAMPLES))


@dataclass(frozen=True)
class Paired:
    """A paired comparison's numbers: mean difference, its 95% interval, the test used and its p-value."""

    n: int
    diff: float
    low: float
    high: float
    p: float
    test: str  # "paired t" | "sign-flip" | "none"
    positive: int  # seeds with a difference > 0
    negative: int  # seeds with a difference < 0
    std: float


def paired_test(diffs, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Paired:
    """Mean of the per-seed differences d_i = x_i - b_i, its 95% Student t interval (clipped to `bounds`,
    the range a difference can take) and a two-sided p-value.

    The test is the paired t (t = mean / (s / √n), n - 1 degrees of freedom) when the |d_i| take at least
    three distinct values; otherwise (fewer than three seeds, a constant difference, a metric that moved
    by the same step on most seeds) it is the exact sign-flip test (`sign_flip_p`). Under the null the two
    runs of a seed are exchangeable, so the differences are symmetric around 0, which is what the t needs
    to hold its level; the choice looks only at the |d_i|, which sign flips leave unchanged, so the exact
    test stays exact. docs/statistics.md has the simulations behind this.
    """
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, "none", 0, 0, math.nan)
    summary = summarize(d, bounds)
    positive, negative = int(np.sum(d > 0)), int(np.sum(d < 0))
    if summary.std > 0 and distinct_magnitudes(d) >= MIN_DISTINCT:
        t = summary.mean / (summary.std / math.sqrt(n))
        p, test = float(2 * special.stdtr(n - 1, -abs(t))), "paired t"
    else:
        p, test = sign_flip_p(d), "sign-flip"
    return Paired(n, summary.mean, summary.low, summary.high, p, test, positive, negative, summary.std)


def distinct_magnitudes(d: np.ndarray) -> int:
    """Number of distinct |d_i|, values within 1e-9 of the largest counted as one (float rounding)."""
    magnitudes = np.sort(np.abs(d))
    tolerance = 1e-9 * max(float(magnitudes[-1]), 1e-300)
    return int(1 + np.sum(np.diff(magnitudes) > tolerance))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment: with p sorted ascending, p_adj(k) = max_{j ≤ k} min(1, (m - j + 1) p_(j)).

    Controls the family-wise error rate (the chance of any false claim) at α for any dependence between
    the tests. NaN entries are left NaN and do not count in m.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    if len(finite) == 0:
        return adjusted
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    steps = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(steps)
    return adjusted


def seeds_needed(paired: Paired, family: int) -> int | None:
    """Matched seeds that would detect a difference of this size with 80% power at the strictest Holm
    level α / family: the paired t's power 1 - F_nct(t_crit; n - 1, δ√n) with δ = mean / std, or, for a
    constant difference, the sign-flip test's n with 2 / 2^n ≤ α / family. At least MIN_SEEDS; None when
    the observed difference is 0, there is one seed, or more than 200 seeds would be needed.
    """
    level = ALPHA / max(1, family)
    if paired.n < 2 or not math.isfinite(paired.diff) or paired.diff == 0:
        return None  # one seed says nothing about the spread
    if not paired.std > 0:
        return max(MIN_SEEDS, math.ceil(math.log2(2 / level)))
    effect = abs(paired.diff) / paired.std
    for n in range(max(MIN_SEEDS, 2), 201):
        critical = stats.t.ppf(1 - level / 2, n - 1)
        if stats.nct.sf(critical, n - 1, effect * math.sqrt(n)) >= POWER:
            return n
    return None
