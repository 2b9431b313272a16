"""The report's figures: metric against imbalance ratio (one line per loss) and per-class recall bars,
each drawn only when it carries information, with intervals inside the metric's range and honest labels.

Each loss has one colour in every plot of every sweep (`loss_colour`, a fixed palette by loss name, a
stable hash for plugin losses), so figures of different sweeps can be compared at a glance; variants of
one loss (its parameters) differ by marker and line style, and the baseline is drawn thicker, edged in
black and labelled. matplotlib's object API only (no pyplot): no global backend state, safe in any process.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import defaultdict

from xentlab.lab.report.compare import Group, contexts, describe
from xentlab.lab.report.stats import NO_RUNS, Summary
from xentlab.lab.report.sweep import finite

RATIO_KEY = "data.imbalance_ratio"
CLASS_RECALL = re.compile(r"^test/recall_class_(\d+)$")
ERROR_BARS = ("error bars: 95% confidence intervals of the mean over seeds (Student t, clipped to the "
              "metric's range)")

# Built-in losses: related losses share a hue family (CE variants blues, margin losses greens, sigmoid
# losses purples), so a plot reads the same in every sweep. The post-hoc rows (CE + logit adjustment,
# CE + temperature scaling) take lighter shades of CE's blue.
LOSS_COLOURS = {
    "ce": "#1f77b4", "ce+posthoc_la": "#6baed6", "ce+ts": "#9ecae1", "weighted_ce": "#17becf",
    "label_smoothing": "#8c564b", "focal": "#ff7f0e", "poly1": "#bcbd22", "gce": "#7f7f7f",
    "logit_adjusted": "#2ca02c", "balanced_softmax": "#98df8a", "ldam": "#006d2c", "bce": "#9467bd",
    "sigmoid_focal": "#c5b0d5", "asl": "#e377c2", "mse": "#d62728", "custom": "#393b79",
}
# Plugin losses: a colour chosen by a stable hash of the name (never one of the built-ins' above).
OTHER_COLOURS = ("#843c39", "#5254a3", "#8ca252", "#bd9e39", "#ad494a", "#a55194", "#6b6ecf", "#637939",
                 "#e7969c", "#de9ed6", "#cedb9c", "#e7cb94")
HATCHES = (None, "..", "xx", "\\\\", "oo")  # the baseline's bars are hatched "//"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")


def loss_colour(name: str) -> str:
    """The colour of loss `name` in every plot: fixed for built-ins, a stable hash for others."""
    return LOSS_COLOURS.get(name) or OTHER_COLOURS[zlib.crc32(name.encode()) % len(OTHER_COLOURS)]


def loss_of(group: Group) -> str:
    """The loss a group trained: its `loss=` setting, else its runs' `loss.name`."""
    if "loss" in group.settings:
        return str(group.settings["loss"])
    config = group.runs[0].config.get("loss") if group.runs else None
    return str(config.get("name")) if isinstance(config, dict) else group.label


class Styles:
    """Colour by loss; marker and line style by variant within a loss (e.g. focal at two gammas)."""

    def __init__(self) -> None:
        self.variants: dict[str, list[str]] = defaultdict(list)

    def variant(self, group: Group, name: str) -> int:
        """0 for the first variant of its loss seen, 1 for the next, ..."""
        seen = self.variants[loss_of(group)]
        if name not in seen:
            seen.append(name)
        return seen.index(name)

    def __call__(self, group: Group, name: str) -> dict:
        loss, index = loss_of(group), self.variant(group, name)
        style = {"color": loss_colour(loss), "marker": MARKERS[index % len(MARKERS)]}
        if group.is_baseline:
            style |= {"linewidth": 2.6, "markeredgecolor": "black", "markeredgewidth": 1.2, "zorder": 3}
        return style | {"linestyle": LINESTYLES[index % len(LINESTYLES)]}


def series_label(group: Group) -> str:
    """A group's label without the imbalance ratio: one line per loss in the ratio plot."""
    return describe(group.settings, [k for k in group.shown if k != RATIO_KEY]) or group.label


def legend_label(group: Group, name: str) -> str:
    return f"{name} (baseline)" if group.is_baseline else name


def error_bars(summaries: list[Summary]) -> list[list[float]]:
    """Asymmetric error bars [below, above] from the (clipped) intervals; 0 where undefined, and where a
    mean outside the metric's range (a malformed record) left the clipped interval beside it."""
    below = [0.0 if math.isnan(s.low) else max(0.0, s.mean - s.low) for s in summaries]
    above = [0.0 if math.isnan(s.high) else max(0.0, s.high - s.mean) for s in summaries]
    return [below, above]


def ratio_of(group: Group) -> float | None:
    """The group's imbalance ratio as a finite float; None when absent or not a number in float range."""
    data = group.runs[0].config.get("data") if group.runs else None
    return finite(data.get("imbalance_ratio")) if isinstance(data, dict) else None


def caption(figure, text: str) -> None:
    """A line under the figure saying what the error bars are."""
    figure.text(0.5, 0.0, text, ha="center", va="bottom", fontsize="small", color="#444444")


def plot_metric_vs_ratio(report):
    """One panel per reported metric: mean and 95% interval against the imbalance ratio, one line per
    loss; None unless the groups span at least two ratios (one ratio has no trend to show)."""
    ratios = {id(g): ratio_of(g) for g in report.groups}
    if not report.metrics or any(r is None for r in ratios.values()):
        return None
    ticks = sorted(set(ratios.values()))
    if len(ticks) < 2:
        return None
    from matplotlib.figure import Figure

    columns = min(3, len(report.metrics))
    rows = -(-len(report.metrics) // columns)
    figure = Figure(figsize=(4.4 * columns, 3.6 * rows + 1.0), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    lines = defaultdict(list)
    for g in report.groups:
        lines[series_label(g)].append(g)
    styles = Styles()
    for ax, metric in zip(axes, report.metrics, strict=False):
        for name, members in lines.items():
            points = sorted(((ratios[id(g)], g.stats[metric.key]) for g in members
                             if metric.key in g.stats), key=lambda point: point[0])
            if points:
                ax.errorbar([x for x, _ in points], [s.mean for _, s in points], capsize=3,
                            yerr=error_bars([s for _, s in points]), label=legend_label(members[0], name),
                            **styles(members[0], name))
        if ticks[0] > 0:
            ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set(title=metric.heading, xlabel="imbalance ratio (majority : minority)")
        ax.grid(alpha=0.3)
    for ax in axes[len(report.metrics):]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize="small", loc="outside lower center", ncols=min(4, len(labels)))
    caption(figure, ERROR_BARS.capitalize())
    return figure


def class_axis_label(groups: list[Group]) -> str:
    """Honest x label: class 0 is the majority only for a multiclass long-tail profile (ratio > 1, no
    explicit counts); multilabel data has labels whose frequencies the generator drew at random."""
    datas = [g.runs[0].config.get("data") for g in groups]
    datas = [d for d in datas if isinstance(d, dict)]
    if not datas or any("imbalance_ratio" not in d for d in datas):
        return "label" if any(d.get("name") == "multilabel" for d in datas) else "class"
    if all((finite(d["imbalance_ratio"]) or 0) > 1 and not d.get("counts") for d in datas):
        return "class (0 = majority, sizes fall with the index)"
    return "class"


def plot_class_recall(report):
    """Per context, grouped bars of each class's test recall (mean and 95% interval), one bar per group,
    coloured by loss, the baseline's bars hatched."""
    classes = sorted({int(m[1]) for g in report.groups for k in g.stats if (m := CLASS_RECALL.match(k))})
    if not classes:
        return None
    from matplotlib.figure import Figure

    blocks = contexts(report.groups)
    figure = Figure(figsize=(max(6.0, 1.1 * len(classes) + 3), 3.2 * len(blocks) + 0.9), layout="constrained")
    axes = figure.subplots(len(blocks), 1, squeeze=False)[:, 0]
    styles = Styles()
    for ax, (context, block) in zip(axes, blocks.items(), strict=True):
        width = 0.8 / len(block)
        for i, g in enumerate(block):
            summaries = [g.stats.get(f"test/recall_class_{c}", NO_RUNS) for c in classes]
            hatch = "//" if g.is_baseline else HATCHES[styles.variant(g, g.label) % len(HATCHES)]
            ax.bar([c - 0.4 + width * (i + 0.5) for c in classes], [s.mean for s in summaries], width,
                   yerr=error_bars(summaries), capsize=2, label=legend_label(g, g.label),
                   color=loss_colour(loss_of(g)), edgecolor="black" if g.is_baseline else "white",
                   hatch=hatch)
        ax.set(title=context or "per-class recall", xlabel=class_axis_label(block), ylabel="test recall",
               xticks=classes, ylim=(0, 1.05))
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    caption(figure, ERROR_BARS.capitalize())
    return figure
