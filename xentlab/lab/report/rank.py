"""Rankings: within each context, each loss's mean rank over seeds and the probability that it is best
(a bootstrap over seeds); across contexts, each loss against the baseline by the Wilcoxon signed-rank test
over contexts with Holm (aggregate.csv), and the critical-difference diagram (report_cd.png).

Ranks are 1 for the best value in the metric's good direction, ties sharing the mean of their ranks.
Across contexts a loss's value in a context is its mean over the seeds it shares with the baseline; the
diagram follows Demšar (2006) with the pairwise Wilcoxon signed-rank tests and Holm that Benavoli,
Corani and Mangili (2016) recommend over the Nemenyi test. docs/statistics.md explains the choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from xentlab.lab.report.compare import Group, Metric, blank, contexts, matched_differences, seed_of
from xentlab.lab.report.stats import ALPHA, holm
from xentlab.lab.report.tables import Table

BOOTSTRAP = 2000  # resamples of the seeds for the probability of being best
MIN_CONTEXTS = 6  # the exact two-sided Wilcoxon p cannot go below 2/2^n: 0.0625 at 5 contexts


@dataclass(frozen=True)
class Ranking:
    """One context and metric: the groups, the seeds all of them ran, each one's mean rank and P(best)."""

    context: str
    metric: Metric
    labels: tuple
    seeds: int
    mean_rank: tuple
    p_best: tuple


def ranks(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Rank of each column within each row of `values` (rows: seeds or contexts; 1 = best, ties averaged)."""
    return stats.rankdata(-values if higher_is_better else values, axis=1)


def probability_best(values: np.ndarray, higher_is_better: bool, resamples: int = BOOTSTRAP,
                     seed: int = 0) -> np.ndarray:
    """Per column, the share of bootstrap resamples of the rows (seeds, drawn with replacement, seeded)
    in which its mean is the best; a tie for best shares the resample evenly."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[rows].mean(axis=1)  # (resamples, columns)
    best = means.max(axis=1, keepdims=True) if higher_is_better else means.min(axis=1, keepdims=True)
    winners = np.isclose(means, best, rtol=0, atol=1e-12)
    return (winners / winners.sum(axis=1, keepdims=True)).mean(axis=0)


def seed_table(groups: list[Group], key: str) -> tuple[list, np.ndarray]:
    """The seeds every group ran with a finite `key`, and the (seeds, groups) table of their values."""
    by_group = [{seed_of(r): r.metrics[key] for r in g.runs if math.isfinite(r.metrics.get(key, math.nan))}
                for g in groups]
    seeds = sorted(set.intersection(*(set(v) for v in by_group)), key=str)
    table = np.array([[v[s] for v in by_group] for s in seeds], dtype=float)
    return seeds, table.reshape(len(seeds), len(groups))


def rankings(groups: list[Group], metrics: list[Metric]) -> list[Ranking]:
    """Per context and metric with at least two groups sharing seeds: mean rank over seeds and P(best)."""
    found = []
    for context, block in contexts(groups).items():
        for metric in metrics:
            members = [g for g in block if metric.key in g.stats]
            if len(members) < 2:
                continue
            seeds, values = seed_table(members, metric.key)
            if not seeds:
                continue
            found.append(Ranking(context, metric, tuple(g.label for g in members), len(seeds),
                                 tuple(ranks(values, metric.higher_is_better).mean(axis=0)),
                                 tuple(probability_best(values, metric.higher_is_better))))
    return found


def rankings_csv_rows(found: list[Ranking]) -> list[list]:
    rows = [["context", "metric", "loss", "seeds", "mean_rank", "p_best"]]
    for r in found:
        for label, rank, best in zip(r.labels, r.mean_rank, r.p_best, strict=True):
            rows.append([r.context, r.metric.key, label, r.seeds, rank, best])
    return rows


@dataclass(frozen=True)
class Across:
    """One loss against the baseline on one metric over contexts: per-context mean differences and the
    Wilcoxon signed-rank test of their median being 0, Holm-adjusted over the aggregate's rows."""

    metric: Metric
    loss: str
    baseline: str
    diffs: tuple
    p: float
    statistic: float
    p_adjusted: float = math.nan

    @property
    def decision(self) -> str:
        if len(self.diffs) < MIN_CONTEXTS:
            return "no claim"
        if not self.p_adjusted < ALPHA:
            return "inconclusive"
        return "better" if (np.median(self.diffs) > 0) == self.metric.higher_is_better else "worse"

    def row(self) -> list:
        d = np.asarray(self.diffs)
        up = self.metric.higher_is_better
        return [self.metric.key, self.loss, self.baseline, len(d), float(d.mean()), float(np.median(d)),
                int(np.sum(d > 0) if up else np.sum(d < 0)), int(np.sum(d < 0) if up else np.sum(d > 0)),
                int(np.sum(d == 0)), self.statistic, self.p, blank(self.p_adjusted), self.decision]


AGGREGATE_COLUMNS = ["metric", "loss", "baseline", "contexts", "mean_diff", "median_diff", "contexts_better",
                     "contexts_worse", "ties", "wilcoxon_statistic", "p", "p_adjusted", "decision"]


def wilcoxon(diffs) -> tuple[float, float]:
    """(statistic, two-sided p) of scipy's Wilcoxon signed-rank test (zero differences dropped; exact
    distribution for small samples without ties); NaN for fewer than two non-zero differences."""
    d = np.asarray(diffs, dtype=float)
    if np.count_nonzero(d) < 2:
        return math.nan, math.nan
    result = stats.wilcoxon(d)
    return float(result.statistic), float(result.pvalue)


def across_contexts(groups: list[Group], metrics: list[Metric]) -> list[Across]:
    """Each non-baseline loss against its context's baseline (the group marked as baseline that is not a
    post-hoc variant), per metric, over the contexts where both have it; Holm over all rows."""
    per: dict[tuple, list[float]] = {}
    names: dict[tuple, str] = {}
    for block in contexts(groups).values():
        base = next((g for g in block if g.is_baseline and g.derived is None), None)
        if base is None:
            continue
        for metric in metrics:
            for group in block:
                if group is base or group.derived is not None or metric.key not in group.stats:
                    continue
                d = matched_differences(group, base, metric.key)
                if d:
                    per.setdefault((metric, group.label), []).append(float(np.mean(d)))
                    names[(metric, group.label)] = base.label
    rows = []
    for (metric, label), diffs in per.items():
        statistic, p = wilcoxon(diffs)
        rows.append(Across(metric, label, names[(metric, label)], tuple(diffs), p, statistic))
    adjusted = holm([r.p if len(r.diffs) >= MIN_CONTEXTS else math.nan for r in rows])
    return [Across(r.metric, r.loss, r.baseline, r.diffs, r.p, r.statistic, float(a))
            for r, a in zip(rows, adjusted, strict=True)]


@dataclass(frozen=True)
class CriticalDifference:
    """One metric's average ranks over contexts and which pairs of losses the pairwise Wilcoxon tests
    with Holm cannot tell apart."""

    metric: Metric
    labels: tuple
    average_rank: tuple
    contexts: int
    different: frozenset  # pairs (i, j), i < j, significantly different after Holm

    def cliques(self) -> list[tuple[int, int]]:
        """Maximal runs [start, end] of losses in rank order no two of which differ significantly: the bars
        of the diagram."""
        order = [int(i) for i in np.argsort(self.average_rank, kind="stable")]

        def apart(a: int, b: int) -> bool:
            return (min(a, b), max(a, b)) in self.different

        runs = []
        for start in range(len(order)):
            end = start
            while end + 1 < len(order) and not any(apart(order[a], order[end + 1])
                                                   for a in range(start, end + 1)):
                end += 1
            if end > start and not any(s <= start and end <= e for s, e in runs):
                runs.append((start, end))
        return runs


def critical_difference(groups: list[Group], metric: Metric) -> CriticalDifference | None:
    """Average ranks (per context by the mean over seeds) of the losses present in every context that has
    the metric, and the pairwise Wilcoxon signed-rank tests over contexts with Holm; None with fewer than
    two losses or two contexts."""
    blocks = [[g for g in block if g.derived is None and metric.key in g.stats]
              for block in contexts(groups).values()]
    blocks = [b for b in blocks if b]
    if len(blocks) < 2:
        return None
    labels = sorted(set.intersection(*({g.label for g in b} for b in blocks)))
    if len(labels) < 2:
        return None
    means = np.array([[next(g for g in b if g.label == label).stats[metric.key].mean for label in labels]
                      for b in blocks])
    pairs = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))]
    p = holm([wilcoxon(means[:, i] - means[:, j])[1] for i, j in pairs])
    different = frozenset(pair for pair, q in zip(pairs, p, strict=True) if q < ALPHA)
    average = tuple(ranks(means, metric.higher_is_better).mean(axis=0))
    return CriticalDifference(metric, tuple(labels), average, len(blocks), different)


def plot_critical_differences(diagrams: list[CriticalDifference]):
    """The critical-difference diagrams (one panel per metric): average rank axis (1 = best, on the left),
    each loss at its rank, and thick bars joining losses the pairwise tests cannot tell apart."""
    from matplotlib.figure import Figure

    height = sum(1.3 + 0.3 * len(d.labels) for d in diagrams)
    figure = Figure(figsize=(8, height), layout="constrained")
    axes = figure.subplots(len(diagrams), 1, squeeze=False)
    for ax, d in zip(axes[:, 0], diagrams, strict=True):
        k = len(d.labels)
        order = np.argsort(d.average_rank, kind="stable")
        ax.set_xlim(1, k)
        ax.set_ylim(-(k + 1), 1.5)
        ax.xaxis.tick_top()
        ax.set_xticks(range(1, k + 1))
        ax.tick_params(axis="x", labelsize=8)
        ax.get_yaxis().set_visible(False)
        for spine in ("left", "right", "bottom"):
            ax.spines[spine].set_visible(False)
        ax.set_title(f"{d.metric.label}: average rank over {d.contexts} contexts (1 = best); bars: no "
                     "difference (pairwise Wilcoxon, Holm)", fontsize=8, pad=18)
        for row, index in enumerate(order):
            rank, left = d.average_rank[index], row < k / 2
            y = -(row + 1)
            ax.plot([rank, rank, 1 if left else k], [1, y, y], color="0.3", lw=0.8, clip_on=False)
            ax.text(1 if left else k, y, f"{d.labels[index]} ({rank:.2f}) " if left
                    else f" {d.labels[index]} ({rank:.2f})", ha="right" if left else "left", va="center",
                    fontsize=8)
        for bar, (start, end) in enumerate(d.cliques()):
            low, high = d.average_rank[order[start]], d.average_rank[order[end]]
            ax.plot([low - 0.03, high + 0.03], [0.6 - 0.25 * bar] * 2, color="black", lw=3,
                    solid_capstyle="butt")
    return figure


def rank_tables(groups: list[Group], metrics: list[Metric]) -> list[Table]:
    """The tables this module adds to a report: rankings.csv always; aggregate.csv (also shown in report.md
    and report.html) when there are at least two contexts."""
    rankings_rows = rankings_csv_rows(rankings(groups, metrics))
    found = [Table("rankings", "Rankings within each context", rankings_rows[0], rankings_rows[1:],
                   frozenset({"csv"}))]
    if len(contexts(groups)) >= 2:
        rows = across_contexts(groups, metrics)
        if rows:
            found.append(Table("aggregate", "Across contexts", AGGREGATE_COLUMNS, [r.row() for r in rows],
                               frozenset({"csv", "md", "html"}),
                               "Each loss against the baseline over contexts: per-context mean paired "
                               "differences, Wilcoxon signed-rank test, Holm over the rows; no claim with "
                               f"fewer than {MIN_CONTEXTS} contexts (docs/statistics.md)."))
    return found


def critical_difference_plot(report):
    """report_cd.png's figure, or None with fewer than two contexts or losses."""
    diagrams = [d for d in (critical_difference(report.groups, m) for m in report.metrics) if d is not None]
    return plot_critical_differences(diagrams) if diagrams else None
