"""Convergence speed from the runs' logged validation curves: epochs until a run first reaches a stated
fraction of its own final value (epochs-to-threshold), per group with intervals and against the baseline.

The curves come from each run's TensorBoard event files (read with TensorBoard's EventAccumulator), so the
section appears for any sweep whose runs logged at least two validation epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from xentlab.lab.report.compare import seed_of
from xentlab.lab.report.stats import Paired, Summary, holm, paired_test, summarize
from xentlab.lab.report.sweep import read_curve

CURVE = "val/balanced_accuracy"
FRACTION = 0.8


def epochs_to_threshold(curve: list[float], fraction: float = FRACTION) -> float:
    """First 1-based validation epoch e with curve[e - 1] ≥ fraction · curve[-1] (the run's final value);
    NaN when the final value is not positive and finite (no threshold to reach)."""
    if not curve or not math.isfinite(curve[-1]) or curve[-1] <= 0:
        return math.nan
    target = fraction * curve[-1]
    return float(next(i + 1 for i, value in enumerate(curve) if value >= target))


@dataclass
class Convergence:
    """Per group the epochs-to-threshold summary, and per non-baseline group the paired difference."""

    rows: list  # (group, Summary, epochs run)
    paired: list  # (group, baseline, Paired, Holm-adjusted p within this section)

    def header(self) -> str:
        return (f"Epochs to {FRACTION:.0%} of the final {CURVE} (first validation epoch reaching it; mean "
                "[95% CI] over seeds, lower is faster)")

    def lines(self) -> list[str]:
        out = [self.header() + ":"]
        for group, summary, epochs in self.rows:
            where = f"{group.context}, " if group.context else ""
            out.append(f"  {where}{group.label}: {summary.text(1)} of {epochs} epochs")
        out += [f"  {text}" for text in self.comparison_text()]
        return out

    def comparison_text(self) -> list[str]:
        texts = []
        for group, base, d, p_adj in self.paired:
            where = f"{group.context}, " if group.context else ""
            adjusted = "" if math.isnan(p_adj) else f", Holm-adjusted over this section {p_adj:.2g}"
            interval = f" [{d.low:+.1f}, {d.high:+.1f}]" if d.n >= 2 else ""
            texts.append(f"{where}{group.label} − {base.label}: {d.diff:+.1f} epochs{interval} "
                         f"on {d.n} seed(s) ({d.test} p = {d.p:.2g}{adjusted})")
        return texts


def convergence(groups: list, baseline: dict) -> Convergence | None:
    """Epochs-to-threshold per group from the runs' event files; None when no run logged ≥ 2 epochs."""
    per_run = {}
    lengths = {}
    for group in groups:
        for run in group.runs:
            curve = read_curve(run.path, CURVE)
            lengths[id(run)] = len(curve)
            per_run[id(run)] = epochs_to_threshold(curve) if len(curve) >= 2 else math.nan
    if not any(n >= 2 for n in lengths.values()):
        return None
    rows = []
    for group in groups:
        longest = max(lengths[id(r)] for r in group.runs)
        rows.append((group, summarize([per_run[id(r)] for r in group.runs], (1, max(1, longest))), longest))
    paired = []
    for group in groups:
        base = next((g for g in groups if g.is_baseline and g.context == group.context), None)
        if base is None or base is group:
            continue
        mine = {seed_of(r): per_run[id(r)] for r in group.runs}
        theirs = {seed_of(r): per_run[id(r)] for r in base.runs}
        diffs = [mine[s] - theirs[s] for s in sorted(set(mine) & set(theirs), key=str)]
        paired.append([group, base, paired_test(diffs), math.nan])
    for item, p in zip(paired, holm([item[2].p for item in paired]), strict=True):
        item[3] = float(p)
    return Convergence(rows, [tuple(item) for item in paired])


__all__ = ["Convergence", "Paired", "Summary", "convergence", "epochs_to_threshold"]
