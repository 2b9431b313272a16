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
          "prior_corrected_ece": UNIT, "classwise_ece": UNIT, "overconfidence": (-1.0, 1.0),
          "brier": (0.0, 2.0), "nll": (0.0, math.inf)}
CLASS_METRIC = re.compile(r"^(recall|precision|f1)_class_\d+$")
# Post-hoc variants of a metric share its range and margin: `ts_ece` (after temperature scaling),
# `la_balanced_accuracy` (after post-hoc logit adjustment).
POSTHOC_PREFIX = re.compile(r"^(ts|la)_")

# Smallest effect size of interest δ per metric: a difference within ±δ is too small to matter, so two
# losses whose difference is shown to lie within it are called equivalent (docs/statistics.md says why
# each value). `report.sesoi` in the config overrides them per metric name.
SESOI = {"accuracy": 0.01, "balanced_accuracy": 0.01, "macro_f1": 0.01, "micro_f1": 0.01, "map": 0.01,
         "minority_recall": 0.02, "exact_match": 0.01, "hamming_loss": 0.005, "ece": 0.005,
         "prior_corrected_ece": 0.005, "classwise_ece": 0.005, "overconfidence": 0.01, "nll": 0.02,
         "brier": 0.01}


def metric_name(key: str) -> str:
    """The metric a key measures: `test/ts_ece` → `ece`, `val/balanced_accuracy` → `balanced_accuracy`."""
    return POSTHOC_PREFIX.sub("", key.rpartition("/")[2])


def sesoi(key: str, chosen: dict | None = None) -> float | None:
    """The equivalence margin δ of a metric: `chosen[name]` (report.sesoi) or the default; None when the
    metric has none (then no equivalence is claimed)."""
    name = metric_name(key)
    value = (chosen or {}).get(name, SESOI.get(name))
    if CLASS_METRIC.match(name) and value is None:
        value = SESOI["minority_recall"]
    return None if value is None else float(value)


def metric_range(key: str) -> tuple[float, float]:
    """(low, high) a metric can take, from its name (`test/ece` → (0, 1)); unbounded when unknown."""
    name = metric_name(key)
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
    return sign_flip_tail(diffs, "two-sided")


def sign_flip_tail(diffs, side: str) -> float:
    """p of the sign-flip test of mean(d) = 0 against `side`: "two-sided" (|Σ s_i d_i| ≥ |Σ d_i|),
    "greater" (Σ s_i d_i ≥ Σ d_i: evidence that the mean is > 0) or "less"."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        return math.nan
    tolerance = 1e-9 * max(np.abs(d).sum(), 1e-300)  # equal sums that differ only by rounding count as ties
    sums = sign_vectors(n) @ d
    if side == "two-sided":
        hits = np.abs(sums) >= abs(d.sum()) - tolerance
    elif side == "greater":
        hits = sums >= d.sum() - tolerance
    else:
        hits = sums <= d.sum() + tolerance
    if n <= EXACT_MAX_N:
        return float(np.mean(hits))
    return float((1 + np.sum(hits)) / (1 + RESAMPLES))


def sign_vectors(n: int) -> np.ndarray:
    """Every vector of n signs (n ≤ 16), else 20 000 drawn with a fixed seed (the same on every call)."""
    if n <= EXACT_MAX_N:
        return (1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)).astype(float)
    return np.random.default_rng(0).choice((-1.0, 1.0), size=(RESAMPLES, n))


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


def seeds_needed(paired: Paired, family: int, start: int = MIN_SEEDS) -> int | None:
    """Matched seeds that would detect a difference of this size with 80% power at the strictest Holm
    level α / family: the paired t's power 1 - F_nct(t_crit; n - 1, δ√n) with δ = mean / std, or, for a
    constant difference, the sign-flip test's n with 2 / 2^n ≤ α / family. At least MIN_SEEDS; None when
    the observed difference is 0, there is one seed, or more than 200 seeds would be needed.
    """
    level = ALPHA / max(1, family)
    if paired.n < 2 or not math.isfinite(paired.diff) or paired.diff == 0:
        return None  # one seed says nothing about the spread
    if not paired.std > 0:
        return max(MIN_SEEDS, start, math.ceil(math.log2(2 / level)))
    effect = abs(paired.diff) / paired.std
    n = np.arange(max(MIN_SEEDS, start, 2), 201)
    power = stats.nct.sf(stats.t.ppf(1 - level / 2, n - 1), n - 1, effect * np.sqrt(n))
    return first_reaching(n, power)


def first_reaching(n: np.ndarray, power: np.ndarray) -> int | None:
    """The first n whose power reaches POWER, None when none does."""
    hits = np.flatnonzero(power >= POWER)
    return int(n[hits[0]]) if len(hits) else None


# --- equivalence and the intervals that match the decisions (docs/statistics.md) ----------------------

def tost_p(diffs, delta: float, test: str) -> float:
    """p of the two one-sided tests (Schuirmann 1987) that the mean difference lies within ±δ:
    max(p of "mean > −δ", p of "mean < +δ"), each a one-sided paired t (n − 1 degrees of freedom), or the
    one-sided sign-flip test of d + δ and d − δ when `test` is "sign-flip" (the test the difference used).
    A small p is evidence of equivalence."""
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    n = len(d)
    if n < 2 or not delta > 0:
        return math.nan
    if test == "paired t":
        se = float(d.std(ddof=1)) / math.sqrt(n)
        lower = float(special.stdtr(n - 1, -(d.mean() + delta) / se))  # H0: mean ≤ −δ
        upper = float(special.stdtr(n - 1, (d.mean() - delta) / se))  # H0: mean ≥ +δ
        return max(lower, upper)
    return max(sign_flip_tail(d + delta, "greater"), sign_flip_tail(d - delta, "less"))


def decision_interval(diffs, level: float, test: str,
                      bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float]:
    """The two-sided (1 − level) interval of the mean difference that inverts the comparison's own test:
    the Student t interval for the paired t; for the sign-flip test, the shifts μ whose differences
    d − μ the test does not reject at `level` (found by bisection on each side of the mean). Clipped to
    `bounds`. With level = α/m (Bonferroni over the m comparisons of the report) the intervals hold
    simultaneously with 95% coverage, and one that excludes 0 always belongs to a Holm-significant
    comparison."""
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    n = len(d)
    if n < 2:
        return (math.nan, math.nan)
    mean = float(d.mean())
    if test == "paired t":
        half = float(special.stdtrit(n - 1, 1 - level / 2)) * float(d.std(ddof=1)) / math.sqrt(n)
        return (max(bounds[0], mean - half), min(bounds[1], mean + half))
    if sign_flip_p(np.full(n, 1.0)) >= level:  # even a constant difference cannot be rejected
        return bounds

    def accepted(mu: float) -> bool:
        return sign_flip_p(d - mu) >= level

    ends = []
    for far in (float(d.min()) - 1e-9 * (1 + abs(d.min())), float(d.max()) + 1e-9 * (1 + abs(d.max()))):
        inside, outside = mean, far  # the test accepts μ = mean (p = 1), rejects beyond every d_i
        for _ in range(50):
            middle = (inside + outside) / 2
            inside, outside = (middle, outside) if accepted(middle) else (inside, middle)
        ends.append(inside)
    return (max(bounds[0], ends[0]), min(bounds[1], ends[1]))


def seeds_to_decide(paired: Paired, delta: float | None, family: int) -> int | None:
    """Matched seeds at which an undecided comparison would be decided with 80% power at the strictest
    Holm level α / family, if the observed mean and spread were the truth: `seeds_needed` (detect the
    difference) when |mean| ≥ δ or no δ is set, else the seeds the two one-sided tests need to show
    equivalence (power ≥ P(reject lower) + P(reject upper) − 1 from the noncentral t). None when not
    estimable or above 200 seeds."""
    if delta is None or not math.isfinite(paired.diff) or abs(paired.diff) >= delta:
        return seeds_needed(paired, family, start=paired.n + 1)
    if paired.n < 2:
        return None
    if not paired.std > 0:  # a constant difference inside the margin: the exact test's floor decides
        return max(MIN_SEEDS, paired.n + 1, math.ceil(math.log2(1 / (ALPHA / max(1, family)))))
    level = ALPHA / max(1, family)
    n = np.arange(max(MIN_SEEDS, paired.n + 1), 201)
    critical, scale = stats.t.ppf(1 - level, n - 1), np.sqrt(n) / paired.std
    lower = stats.nct.sf(critical, n - 1, (paired.diff + delta) * scale)
    upper = stats.nct.cdf(-critical, n - 1, (paired.diff - delta) * scale)
    return first_reaching(n, lower + upper - 1)
