"""Matplotlib figures for TensorBoard: confusion matrix, reliability diagram, loss vs true-class probability.

Figures are built with matplotlib's object API (no pyplot, no global state, no GUI backend) and
rendered to HWC uint8 arrays with `to_image`, ready for `SummaryWriter.add_image(..., dataformats="HWC")`.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 80


def to_image(figure: Figure) -> np.ndarray:
    """The figure rasterised with Agg as an (H, W, 3) uint8 array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_matrix_figure(matrix: np.ndarray, title: str = "confusion matrix") -> Figure:
    """Heatmap of the row-normalised confusion matrix M_ij / sum_j M_ij (rows: true class), so the
    diagonal is per-class recall whatever the class sizes; cells are annotated with raw counts."""
    figure = _confusion_layout(len(matrix))
    _fill_confusion(figure, matrix, title)
    return figure


def _confusion_layout(n: int) -> Figure:
    """The confusion-matrix figure for n classes without its data (`_fill_confusion` adds it)."""
    figure = Figure(figsize=(2.2 + 0.45 * max(n, 4), 1.4 + 0.45 * max(n, 4)), dpi=DPI)
    ax = figure.add_subplot()
    image = ax.imshow(np.zeros((n, n)), vmin=0, vmax=1, cmap="Blues")
    figure.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    if n <= 20:
        for i, j in np.ndindex(n, n):
            ax.text(j, i, "", ha="center", va="center", fontsize=8)
    ax.set(xlabel="predicted class", ylabel="true class", xticks=range(n), yticks=range(n))
    figure.subplots_adjust(left=0.12, right=0.84, top=0.9, bottom=0.15)
    return figure


def _fill_confusion(figure: Figure, matrix: np.ndarray, title: str) -> None:
    matrix = np.asarray(matrix, dtype=float)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax = figure.axes[0]
    ax.images[0].set_data(rates)
    for (i, j), text in zip(np.ndindex(*matrix.shape), ax.texts, strict=False):
        text.set_text(f"{int(matrix[i, j])}")
        text.set_color("white" if rates[i, j] > 0.5 else "black")
    ax.set_title(title)


def multilabel_confusion_figure(matrices: np.ndarray, title: str = "per-label confusion") -> Figure:
    """Per-label rates from (L, 2, 2) counts [[TN, FP], [FN, TP]]: one row per label with
    TNR = TN/(TN+FP), FPR, FNR, TPR = TP/(TP+FN) (recall), annotated with the counts."""
    matrices = np.asarray(matrices, dtype=float)
    counts = matrices.reshape(len(matrices), 4)
    rates = (matrices / np.maximum(matrices.sum(axis=2, keepdims=True), 1)).reshape(len(matrices), 4)
    figure = Figure(figsize=(4.5, 1.0 + 0.35 * len(matrices)), dpi=DPI)
    ax = figure.add_subplot()
    ax.imshow(rates, vmin=0, vmax=1, cmap="Blues", aspect="auto")
    for i, j in np.ndindex(*rates.shape):
        ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xticks=range(4), xticklabels=["TN", "FP", "FN", "TP"], yticks=range(len(matrices)),
           ylabel="label", title=title)
    figure.subplots_adjust(left=0.15, right=0.95, top=0.88, bottom=0.1)
    return figure


def reliability_figure(confidence: np.ndarray, accuracy: np.ndarray, count: np.ndarray, ece: float,
                       title: str = "reliability") -> Figure:
    """Reliability diagram: per equal-width confidence bin, accuracy against the diagonal (perfect
    calibration), the gap to each bin's mean confidence shaded; below, how many samples fall in each bin."""
    figure = _reliability_layout(len(count))
    _fill_reliability(figure, confidence, accuracy, count, ece, title)
    return figure


def _reliability_layout(n_bins: int) -> Figure:
    """The reliability figure for n_bins bins without its data (`_fill_reliability` adds it): one bar of
    each series per bin, those of empty bins hidden when filled."""
    centers = (np.arange(n_bins) + 0.5) / n_bins
    figure = Figure(figsize=(4.5, 5.0), dpi=DPI)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers, np.zeros(n_bins), width=1 / n_bins, edgecolor="black", label="accuracy")
    top.bar(centers, np.zeros(n_bins), width=1 / n_bins, fill=False, hatch="//", edgecolor="red",
            label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1)
    top.set(ylim=(0, 1), ylabel="accuracy")
    # Built while every bar is visible: a legend entry copies its series' first bar, visibility included.
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, np.zeros(n_bins), width=1 / n_bins, color="gray")
    bottom.set(xlim=(0, 1), xlabel="top-label confidence", ylabel="samples")
    # Fixed margins: tight_layout would draw the figure twice, doubling its cost.
    figure.subplots_adjust(left=0.16, right=0.96, top=0.93, bottom=0.1, hspace=0.08)
    return figure


def _fill_reliability(figure: Figure, confidence, accuracy, count, ece: float, title: str) -> None:
    confidence, accuracy, count = (np.asarray(a, dtype=float) for a in (confidence, accuracy, count))
    top, bottom = figure.axes
    accuracy_bars, gap_bars = top.containers
    for k, (acc, conf, n) in enumerate(zip(accuracy, confidence, count, strict=True)):
        accuracy_bars[k].set_height(acc)
        gap_bars[k].set_y(acc)
        gap_bars[k].set_height(conf - acc)
        accuracy_bars[k].set_visible(n > 0)
        gap_bars[k].set_visible(n > 0)
    for bar, n in zip(bottom.containers[0], count, strict=True):
        bar.set_height(n)
    bottom.relim()
    bottom.autoscale_view()
    top.set_title(f"{title} (ECE {ece:.3f}, {len(count)} bins)")


class _TickMarks:
    """The tick marks (no labels) that an axis (`matplotlib.axis.Axis`) shows, to be drawn on their own."""

    def __init__(self, axis) -> None:
        self.axis, self.lines = axis, []

    def find(self) -> None:
        """Takes the marks of the ticks the last draw placed (matplotlib's own choice of those in view)."""
        self.lines = [line for tick in self.axis._update_ticks() for line in (tick.tick1line, tick.tick2line)
                      if line.get_visible()]

    def draw(self, renderer) -> None:
        for line in self.lines:
            line.draw(renderer)


class _Blitted:
    """A figure whose fixed parts (axes, tick labels, axis labels, colour bar) are rasterised once, kept as
    a background, and whose changing `artists` (its data) are drawn over a copy of that background for
    every image: laying out and drawing the tick labels is most of a small figure's cost. `artists` come
    in the order a full draw draws them (by zorder: patches and images, the axes (1.5, as
    `axes.axisbelow: line` puts them), lines, the frame, texts, the legend), `_TickMarks` among them since a
    mark's antialiased end overlaps the data at the frame; so the pixels are those of a full draw
    (tests/test_metrics.py)."""

    def __init__(self, figure: Figure, artists: list):
        self.figure, self.canvas, self.artists = figure, FigureCanvasAgg(figure), artists
        marks = [artist for artist in artists if isinstance(artist, _TickMarks)]
        for artist in artists:
            if isinstance(artist, _TickMarks):
                artist.find()
                for line in artist.lines:
                    line.set_visible(False)
            else:
                artist.set_animated(True)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(figure.bbox)
        for line in (line for artist in marks for line in artist.lines):
            line.set_visible(True)

    def image(self) -> np.ndarray:
        self.canvas.restore_region(self.background)
        renderer = self.canvas.get_renderer()
        for artist in self.artists:
            artist.draw(renderer)
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


def _blitted_confusion(n: int) -> _Blitted:
    figure = _confusion_layout(n)
    ax = figure.axes[0]
    return _Blitted(figure, [*ax.images, _TickMarks(ax.xaxis), _TickMarks(ax.yaxis), *ax.spines.values(),
                             *ax.texts, ax.title])


def _blitted_reliability(n_bins: int) -> _Blitted:
    figure = _reliability_layout(n_bins)
    top, bottom = figure.axes
    # The count axis (bottom.yaxis) rescales to each data set, so it is redrawn whole.
    return _Blitted(figure, [
        *(bar for container in top.containers for bar in container), _TickMarks(top.xaxis),
        _TickMarks(top.yaxis), *top.lines, *top.spines.values(), top.title, top.get_legend(),
        *bottom.patches, _TickMarks(bottom.xaxis), bottom.yaxis, *bottom.spines.values()])


class Redrawn:
    """Confusion-matrix and reliability images drawn into one kept figure per layout (`_Blitted`), its
    data replaced each time: building the figure and drawing its axes costs more than drawing its data,
    and a run (a seed batch: each of its seeds) draws the same layouts at its last validation epoch and at
    test. The pixels are those of a fresh figure with the same data (tests/test_metrics.py)."""

    def __init__(self) -> None:
        self._figures: dict[tuple[str, int], _Blitted] = {}

    def _figure(self, kind: str, size: int, layout) -> _Blitted:
        if (kind, size) not in self._figures:
            self._figures[kind, size] = layout(size)
        return self._figures[kind, size]

    def confusion_matrix(self, matrix: np.ndarray, title: str) -> np.ndarray:
        """`to_image(confusion_matrix_figure(matrix, title))`."""
        blitted = self._figure("confusion", len(matrix), _blitted_confusion)
        _fill_confusion(blitted.figure, matrix, title)
        return blitted.image()

    def reliability(self, confidence, accuracy, count, ece: float, title: str) -> np.ndarray:
        """`to_image(reliability_figure(confidence, accuracy, count, ece, title))`."""
        blitted = self._figure("reliability", len(count), _blitted_reliability)
        _fill_reliability(blitted.figure, confidence, accuracy, count, ece, title)
        return blitted.image()


def loss_curves_figure(p_true: np.ndarray, curves: dict[str, tuple[np.ndarray, np.ndarray]],
                       title: str = "loss vs true-class probability") -> Figure:
    """Each named loss against p_true (left) and the norm of its gradient w.r.t. the logits (right):
    the push a sample gets at each confidence; `curves` maps name -> (loss values, gradient norms)."""
    figure = Figure(figsize=(8.0, 3.6), dpi=DPI)
    left, right = figure.subplots(1, 2)
    for name, (values, grads) in curves.items():
        left.plot(p_true, values, label=name)
        right.plot(p_true, grads, label=name)
    left.set(xlabel="p(true class)", ylabel="loss", title=title)
    right.set(xlabel="p(true class)", ylabel="||d loss / d logits||", title="gradient norm")
    left.legend(fontsize=8)
    figure.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.15, wspace=0.25)
    return figure
