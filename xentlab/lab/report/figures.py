"""The report's figures: metric against imbalance ratio (one line per loss) and per-class recall bars,
each drawn only when it carries information, with intervals inside the metric's range and honest labels.
matplotlib's object API only (no pyplot): no global backend state, safe in any process.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

from xentlab.lab.report.compare import Group, contexts, describe
from xentlab.lab.report.stats import NO_RUNS, Summary

RATIO_KEY = "data.imbalance_ratio"
CLASS_RECALL = re.compile(r"^test/recall_class_(\d+)$")


def series_label(group: Group) -> str:
    """A group's label without the imbalance ratio: one line per loss in the ratio plot."""
    return describe(group.settings, [k for k in group.shown if k != RATIO_KEY]) or group.label


def error_bars(summaries: list[Summary]) -> list[list[float]]:
    """Asymmetric error bars [below, above] from the (clipped) intervals; 0 where undefined."""
    below = [0.0 if math.isnan(s.low) else s.mean - s.low for s in summaries]
    above = [0.0 if math.isnan(s.high) else s.high - s.mean for s in summaries]
    return [below, above]


def ratio_of(group: Group):
    data = group.runs[0].config.get("data")
    return data.get("imbalance_ratio") if isinstance(data, dict) else None


def plot_metric_vs_ratio(report):
    """One panel per key metric: mean and 95% interval against the imbalance ratio, one line per loss;
    None unless the groups span at least two ratios (one ratio has no trend to show)."""
    ratios = {id(g): ratio_of(g) for g in report.groups}
    if not report.metrics or any(not isinstance(r, (int, float)) for r in ratios.values()):
        return None
    ticks = sorted({float(r) for r in ratios.values()})
    if len(ticks) < 2:
        return None
    from matplotlib.figure import Figure

    columns = min(3, len(report.metrics))
    rows = -(-len(report.metrics) // columns)
    figure = Figure(figsize=(4.4 * columns, 3.6 * rows + 0.8), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    lines = defaultdict(list)
    for g in report.groups:
        lines[series_label(g)].append(g)
    for ax, metric in zip(axes, report.metrics, strict=False):
        for name, members in lines.items():
            points = sorted(((float(ratios[id(g)]), g.stats[metric.key]) for g in members
                             if metric.key in g.stats), key=lambda point: point[0])
            if points:
                ax.errorbar([x for x, _ in points], [s.mean for _, s in points], capsize=3, marker="o",
                            yerr=error_bars([s for _, s in points]), label=name)
        if ticks[0] > 0:
            ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set(title=metric.heading, xlabel="imbalance ratio (majority : minority)")
        ax.grid(alpha=0.3)
    for ax in axes[len(report.metrics):]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize="small", loc="outside lower center", ncols=min(4, len(labels)))
    return figure


def class_axis_label(groups: list[Group]) -> str:
    """Honest x label: class 0 is the majority only for a multiclass long-tail profile (ratio > 1, no
    explicit counts); multilabel data has labels whose frequencies the generator drew at random."""
    datas = [g.runs[0].config.get("data") for g in groups]
    datas = [d for d in datas if isinstance(d, dict)]
    if not datas or any("imbalance_ratio" not in d for d in datas):
        return "label" if any(d.get("name") == "multilabel" for d in datas) else "class"
    if all(isinstance(d["imbalance_ratio"], (int, float)) and d["imbalance_ratio"] > 1 and not d.get("counts")
           for d in datas):
        return "class (0 = majority, sizes fall with the index)"
    return "class"


def plot_class_recall(report):
    """Per context, grouped bars of each class's test recall (mean and 95% interval), one bar per group."""
    classes = sorted({int(m[1]) for g in report.groups for k in g.stats if (m := CLASS_RECALL.match(k))})
    if not classes:
        return None
    from matplotlib.figure import Figure

    blocks = contexts(report.groups)
    figure = Figure(figsize=(max(6.0, 1.1 * len(classes) + 3), 3.2 * len(blocks) + 0.6), layout="constrained")
    axes = figure.subplots(len(blocks), 1, squeeze=False)[:, 0]
    for ax, (context, block) in zip(axes, blocks.items(), strict=True):
        width = 0.8 / len(block)
        for i, g in enumerate(block):
            summaries = [g.stats.get(f"test/recall_class_{c}", NO_RUNS) for c in classes]
            ax.bar([c - 0.4 + width * (i + 0.5) for c in classes], [s.mean for s in summaries], width,
                   yerr=error_bars(summaries), capsize=2, label=g.label)
        ax.set(title=context or "per-class recall", xlabel=class_axis_label(block), ylabel="test recall",
               xticks=classes, ylim=(0, 1.05))
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure
