"""Sweep report: every job's `metrics.json` under a folder → mean ± 95% CI per group → which loss wins.

Reads files only, never live objects, so it works on a sweep still running or partly failed: jobs that
finished are reported, failed ones are listed with their error, started-but-unfinished ones are counted.
Runs are grouped by every override except the seed; within each context (the non-loss overrides, e.g.
one imbalance ratio) the best loss per metric is marked and compared with the runner-up.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from scipy.special import stdtrit

# Same name as xentlab.train.METRICS_FILE; not imported from there, which would pull Hydra in.
METRICS_FILE = "metrics.json"
# Overrides that do not change what a run measures: the seed is what a group averages over.
NOT_GROUPING = frozenset({"seed", "ckpt_path", "threads"})
RATIO_KEY = "data.imbalance_ratio"
CLASS_RECALL = re.compile(r"^test/recall_class_(\d+)$")
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool

    @property
    def heading(self) -> str:
        return f"{self.label} {'↑' if self.higher_is_better else '↓'}"


KEY_METRICS = (
    Metric("test/balanced_accuracy", "balanced acc", True),
    Metric("test/macro_f1", "macro-F1", True),
    Metric("test/minority_recall", "minority recall", True),
    Metric("test/ece", "ECE", False),
    Metric("test/nll", "NLL", False),
)


@dataclass(frozen=True)
class Run:
    """One job as its metrics.json recorded it (`overrides` is None in files written before they were)."""

    path: Path
    status: str
    metrics: dict
    config: dict
    overrides: tuple[str, ...] | None
    error: str | None = None


@dataclass(frozen=True)
class Summary:
    """Mean, 95% confidence half-width (Student t), standard deviation and count of one metric's values."""

    mean: float
    half_width: float
    std: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


NO_RUNS = Summary(math.nan, math.nan, math.nan, 0)  # a metric no run recorded


@dataclass
class Group:
    """Completed runs sharing every grouping override; `label` shows only the overrides that vary."""

    settings: dict
    label: str
    context: str
    runs: list
    stats: dict
    shown: list


@dataclass(frozen=True)
class Verdict:
    """Best vs runner-up on one metric within one context."""

    context: str
    metric: Metric
    best: Group
    runner_up: Group
    paired: Summary | None

    def sentence(self) -> str:
        """One line: best, runner-up, the margin (absolute and relative) and how sure it is."""
        a, b = self.best.stats[self.metric.key], self.runner_up.stats[self.metric.key]
        margin = abs(a.mean - b.mean)
        where = f"{self.context}, " if self.context else ""
        better = "higher" if self.metric.higher_is_better else "lower"
        head = f"{where}{self.metric.label} ({better} is better): {self.best.label} {a.text()}"
        if margin == 0:
            return f"{head} ties with {self.runner_up.label}."
        percent = f"{100 * margin / abs(b.mean):.0f}%" if b.mean else ""
        relative = f" ({'<1%' if percent == '0%' else percent} {better})" if percent else ""
        amount = f"{margin:.3f}" if margin >= 5e-4 else f"{margin:.1e}"
        head += f" beats {self.runner_up.label} {b.text()} by {amount}{relative}"
        return f"{head}; {self.certainty(a, b)}."

    def certainty(self, a: Summary, b: Summary) -> str:
        """Separation at 95%: disjoint intervals, else a paired per-seed difference excluding 0, else none."""
        if a.n < 2 or b.n < 2:
            return "one run on a side, so no confidence interval"
        if a.low > b.high or b.low > a.high:
            return f"95% CIs do not overlap (n={a.n} vs {b.n}): a clear win"
        if self.paired is not None and (self.paired.low > 0 or self.paired.high < 0):
            return (f"95% CIs overlap, but the per-seed difference {self.paired.mean:+.3f} "
                    f"[{self.paired.low:+.3f}, {self.paired.high:+.3f}] over {self.paired.n} shared seeds "
                    "excludes 0: a win on matched seeds")
        return f"95% CIs overlap (n={a.n} vs {b.n}): not separable at this sample size"


@dataclass
class Report:
    sweep_dir: Path
    groups: list
    verdicts: list
    metrics: list
    problems: list
    pending: list
    files: list


def summarize(values) -> Summary:
    """Mean ± t_{0.975, n-1} · s / √n over the finite `values` (s: sample std, ddof=1).

    The half-width (and std) is NaN for a single value: one seed says nothing about the spread.
    """
    values = [float(v) for v in values if math.isfinite(v)]
    n = len(values)
    if n == 0:
        return NO_RUNS
    mean = sum(values) / n
    if n < 2:
        return Summary(mean, math.nan, math.nan, 1)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    # stdtrit is the t quantile scipy.stats.t.ppf calls; scipy.stats itself takes 0.25 s longer to import.
    return Summary(mean, float(stdtrit(n - 1, 0.5 + CONFIDENCE / 2)) * std / math.sqrt(n), std, n)


def load_runs(sweep_dir: Path) -> tuple[list[Run], list[Path]]:
    """Every metrics.json under `sweep_dir`, and the job folders that started (have `.hydra/`) without one."""
    runs = []
    for file in sorted(sweep_dir.rglob(METRICS_FILE)):
        try:
            record = json.loads(file.read_text())
        except (OSError, ValueError) as error:
            runs.append(Run(file.parent, "unreadable", {}, {}, None, f"{type(error).__name__}: {error}"))
            continue
        overrides = record.get("overrides")
        runs.append(Run(file.parent, record.get("status", "unknown"), record.get("metrics") or {},
                        record.get("config") or {}, None if overrides is None else tuple(overrides),
                        record.get("error")))
    done = {run.path for run in runs}
    # A job that trained a batch of seeds holds its runs' metrics.json in subfolders (seed=<s>/).
    pending = sorted(marker.parent for marker in sweep_dir.rglob(".hydra")
                     if not any(path == marker.parent or marker.parent in path.parents for path in done))
    return runs, pending


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config → {"group.key": "value"} with values as strings."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def run_settings(runs: list[Run]) -> list[dict]:
    """Per run, the `key -> value` choices that define its group: its overrides, minus NOT_GROUPING.

    When some run has no recorded overrides, the config values that differ between runs stand in for them.
    """
    if all(run.overrides is not None for run in runs):
        settings = [dict(o.lstrip("+~").partition("=")[::2] for o in run.overrides) for run in runs]
    else:
        flat = [flatten(run.config) for run in runs]
        settings = [{k: f.get(k, "-") for k in varying_keys(flat)} for f in flat]
    return [{k: v for k, v in s.items() if k not in NOT_GROUPING} for s in settings]


def varying_keys(dicts: list[dict]) -> list[str]:
    """The keys, sorted, whose value (None where missing) is not the same in every dict."""
    keys = sorted({k for d in dicts for k in d})
    return [k for k in keys if len({d.get(k) for d in dicts}) > 1]


def is_loss_key(key: str) -> bool:
    """Whether an override key chooses the loss or one of its parameters (`loss`, `loss.gamma`, ...)."""
    return key == "loss" or key.startswith("loss.") or key.startswith("loss/")


def layout(settings: list[dict]) -> tuple[list[str], list[str]]:
    """Varying keys split into contender keys (the loss and its parameters) and context keys (the rest).

    When no loss setting varies, every varying key is a contender and there is a single context.
    """
    varying = varying_keys(settings)
    contenders = [k for k in varying if is_loss_key(k)]
    if not contenders:
        return varying, []
    return contenders, [k for k in varying if not is_loss_key(k)]


def describe(setting: dict, keys: list[str]) -> str:
    """`key=value, ...` for the given keys of a setting, in that order."""
    return ", ".join(f"{k}={setting[k]}" for k in keys if k in setting)


def seed_of(run: Run) -> object:
    """The run's seed (from its config), which pairs runs of different groups on the same data split."""
    return run.config.get("seed", run.path.name)


def build_groups(runs: list[Run]) -> list[Group]:
    """Completed runs grouped by their settings, each metric summarised over the group's runs."""
    settings = run_settings(runs)
    contenders, context = layout(settings)
    members: dict[tuple, list[Run]] = defaultdict(list)
    by_key = {}
    for run, setting in zip(runs, settings, strict=True):
        key = tuple(sorted(setting.items()))
        by_key[key] = setting
        if run.status == "completed":
            members[key].append(run)
    groups = []
    for key, group_runs in members.items():
        setting = by_key[key]
        names = sorted({m for run in group_runs for m in run.metrics})
        summaries = {m: summarize([run.metrics[m] for run in group_runs if m in run.metrics]) for m in names}
        groups.append(Group(setting, describe(setting, contenders) or "all runs", describe(setting, context),
                            group_runs, summaries, contenders + context))
    return sorted(groups, key=lambda g: (sort_key(g.context), sort_key(g.label)))


def sort_key(text: str) -> tuple:
    """Numbers inside labels compare as numbers, so ratio=10 sorts after ratio=2."""
    return tuple((0, float(p), "") if re.fullmatch(r"-?\d+(\.\d+)?", p) else (1, 0.0, p)
                 for p in re.split(r"([=, ])", text))


def contexts(groups: list[Group]) -> dict[str, list[Group]]:
    """Groups by context, in order: each block is one comparison (e.g. every loss at one ratio)."""
    blocks: dict[str, list[Group]] = defaultdict(list)
    for group in groups:
        blocks[group.context].append(group)
    return dict(blocks)


def ranked(groups: list[Group], metric: Metric) -> list[Group]:
    """Groups that reported `metric`, best first."""
    present = [g for g in groups if metric.key in g.stats and g.stats[metric.key].n > 0]
    return sorted(present, key=lambda g: g.stats[metric.key].mean, reverse=metric.higher_is_better)


def paired_difference(best: Group, other: Group, key: str) -> Summary | None:
    """Summary of best − other over the seeds both groups ran (same seed ⇒ same data split); None if < 2."""
    a = {seed_of(r): r.metrics[key] for r in best.runs if key in r.metrics}
    b = {seed_of(r): r.metrics[key] for r in other.runs if key in r.metrics}
    shared = sorted(set(a) & set(b), key=str)
    return summarize([a[s] - b[s] for s in shared]) if len(shared) >= 2 else None


def verdicts(groups: list[Group], metrics: list[Metric]) -> list[Verdict]:
    """Per context and metric: best vs runner-up, with the paired per-seed difference when seeds match."""
    found = []
    for context, block in contexts(groups).items():
        for metric in metrics:
            order = ranked(block, metric)
            if len(order) >= 2:
                found.append(Verdict(context, metric, order[0], order[1],
                                     paired_difference(order[0], order[1], metric.key)))
    return found


def best_cells(groups: list[Group], metrics: list[Metric]) -> set[tuple[int, str]]:
    """(group index, metric key) of the best group(s), ties included, per metric within each context.

    Contexts with a single group mark nothing: there is nothing to beat.
    """
    index = {id(g): i for i, g in enumerate(groups)}
    marked = set()
    for block in contexts(groups).values():
        for metric in metrics:
            order = ranked(block, metric)
            if len(order) >= 2:
                top = order[0].stats[metric.key].mean
                marked |= {(index[id(g)], metric.key) for g in order if g.stats[metric.key].mean == top}
    return marked


def cell(group: Group, metric: Metric) -> str:
    """`mean ± half-width`, with `(n=k)` when fewer of the group's runs reported the metric; `—` if none."""
    summary = group.stats.get(metric.key)
    if summary is None or summary.n == 0:
        return "—"
    text = summary.text()
    return text if summary.n == len(group.runs) else f"{text} (n={summary.n})"


def table_rows(groups: list[Group], metrics: list[Metric]) -> list[tuple[list[str], list[bool]]]:
    """Per group: the cells [context, contender, n, metric...] and whether each metric cell is the best."""
    best = best_cells(groups, metrics)
    return [([g.context, g.label, str(len(g.runs))] + [cell(g, m) for m in metrics],
             [(i, m.key) in best for m in metrics]) for i, g in enumerate(groups)]


def rich_table(report: Report) -> Table:
    """The console table: one row per group, one section per context, best cells starred."""
    table = Table(title="mean ± 95% CI over seeds, ★ best in its block", title_justify="left")
    has_context = any(g.context for g in report.groups)
    if has_context:
        table.add_column("context", overflow="fold")
    table.add_column("loss / run", overflow="fold")
    table.add_column("n", justify="right")
    for metric in report.metrics:
        table.add_column(metric.heading, justify="right", no_wrap=True)
    rows = table_rows(report.groups, report.metrics)
    for i, (cells, marks) in enumerate(rows):
        values = [f"[bold green]★ {c}[/]" if mark else c for c, mark in zip(cells[3:], marks, strict=True)]
        last_in_block = i + 1 == len(rows) or report.groups[i + 1].context != report.groups[i].context
        table.add_row(*(cells[:3] if has_context else cells[1:3]), *values, end_section=last_in_block)
    return table


def markdown(report: Report) -> str:
    """report.md: verdicts first (the answer), then the full table, problems and the plots."""
    done = sum(len(g.runs) for g in report.groups)
    lines = [f"# Sweep report: `{report.sweep_dir}`", "",
             f"{done} completed runs in {len(report.groups)} groups, {len(report.problems)} failed or "
             f"incomplete, {len(report.pending)} still running or never finished.", ""]
    said = [f"- {v.sentence()}" for v in report.verdicts] or ["- (fewer than two groups to compare)"]
    lines += ["## Verdicts", "", *said]
    lead = slice(0 if any(g.context for g in report.groups) else 1, 3)  # no context column without contexts
    headings = ["context", "loss / run", "n"][lead] + [m.heading for m in report.metrics]
    lines += ["", "## Results", "", "Mean ± 95% confidence interval (Student t over seeds); ★ marks the best "
              "value within each context.", "", "| " + " | ".join(headings) + " |",
              "|" + "---|" * len(headings)]
    for cells, marks in table_rows(report.groups, report.metrics):
        values = [f"**★ {c}**" if mark else c for c, mark in zip(cells[3:], marks, strict=True)]
        lines.append("| " + " | ".join(cells[lead] + values) + " |")
    missing = [m.key for m in KEY_METRICS if m not in report.metrics]
    if missing:
        lines += ["", f"Not reported by these runs: {', '.join(missing)}."]
    lines += problem_lines(report)
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in report.files if p.suffix == ".png"]
    return "\n".join(lines) + "\n"


def problem_lines(report: Report) -> list[str]:
    """Markdown for failed, unreadable or interrupted jobs (with their errors) and unfinished ones."""
    lines = []
    if report.problems:
        lines += ["", "## Failed or incomplete jobs", "", "| job | status | error |", "|---|---|---|"]
        for run in report.problems:
            error = (run.error or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {relative(run.path, report.sweep_dir)} | {run.status} | {error} |")
    if report.pending:
        lines += ["", "## Running or never finished (no metrics.json yet)", ""]
        lines += [f"- {relative(p, report.sweep_dir)}" for p in report.pending]
    return lines


def relative(path: Path, root: Path) -> str:
    """`path` relative to the sweep folder, for short job names."""
    return str(path.relative_to(root)) if path != root else "."


def write_csv(report: Report, path: Path) -> Path:
    """report.csv: one row per group with its settings and, per test metric, mean, ci95 half-width, std, n."""
    keys = sorted({k for g in report.groups for k in g.settings})
    names = sorted({m for g in report.groups for m in g.stats if m.startswith("test/")})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["context", "group", *keys, "n"]
                        + [f"{m}_{part}" for m in names for part in ("mean", "ci95", "std", "n")])
        for g in report.groups:
            values = []
            for m in names:
                s = g.stats.get(m, NO_RUNS)
                values += [s.mean, s.half_width, s.std, s.n]
            settings = [g.settings.get(k, "") for k in keys]
            writer.writerow([g.context, g.label, *settings, len(g.runs), *values])
    return path


def series_label(group: Group) -> str:
    """A group's label without the imbalance ratio: one line per loss in the ratio plot."""
    return describe(group.settings, [k for k in group.shown if k != RATIO_KEY]) or "all runs"


def error_bar(summary: Summary) -> float:
    """The 95% half-width as an error bar; 0 where it is undefined (a single run)."""
    return 0.0 if math.isnan(summary.half_width) else summary.half_width


def plot_metric_vs_ratio(report: Report, path: Path) -> Path | None:
    """One panel per key metric: mean ± 95% CI against the imbalance ratio, one line per loss."""
    ratios = {id(g): g.runs[0].config.get("data", {}).get("imbalance_ratio") for g in report.groups}
    if not report.metrics or any(r is None for r in ratios.values()):
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe in any process

    columns = min(3, len(report.metrics))
    rows = -(-len(report.metrics) // columns)
    figure = Figure(figsize=(4.4 * columns, 3.6 * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    lines = defaultdict(list)
    for g in report.groups:
        lines[series_label(g)].append(g)
    ticks = sorted({float(r) for r in ratios.values()})
    for ax, metric in zip(axes, report.metrics, strict=False):
        for name, members in lines.items():
            reported = [g for g in members if metric.key in g.stats]
            points = sorted(((float(ratios[id(g)]), g.stats[metric.key]) for g in reported),
                            key=lambda point: point[0])
            if points:
                ax.errorbar([x for x, _ in points], [s.mean for _, s in points], capsize=3, marker="o",
                            yerr=[error_bar(s) for _, s in points], label=name)
        if len(ticks) > 1 and ticks[0] > 0:
            ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set(title=metric.heading, xlabel="imbalance ratio (majority : minority)")
        ax.grid(alpha=0.3)
    spare = axes[len(report.metrics):]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    holder = spare[0] if spare else axes[0]  # the empty panel, when there is one, holds the legend
    holder.legend(handles, labels, fontsize="small", loc="center" if spare else "best")
    figure.savefig(path, dpi=110)
    return path


def plot_class_recall(report: Report, path: Path) -> Path | None:
    """Per context, grouped bars of each class's test recall (mean ± 95% CI), one bar per loss."""
    classes = sorted({int(m[1]) for g in report.groups for k in g.stats if (m := CLASS_RECALL.match(k))})
    if not classes:
        return None
    from matplotlib.figure import Figure

    blocks = contexts(report.groups)
    figure = Figure(figsize=(max(6.0, 1.1 * len(classes) + 3), 3.2 * len(blocks)), layout="constrained")
    axes = figure.subplots(len(blocks), 1, squeeze=False)[:, 0]
    for ax, (context, block) in zip(axes, blocks.items(), strict=True):
        width = 0.8 / len(block)
        for i, g in enumerate(block):
            summaries = [g.stats.get(f"test/recall_class_{c}", NO_RUNS)
                         for c in classes]
            ax.bar([c - 0.4 + width * (i + 0.5) for c in classes], [s.mean for s in summaries], width,
                   yerr=[error_bar(s) for s in summaries], capsize=2,
                   label=g.label)
        ax.set(title=context or "per-class recall", xlabel="class (0 = majority)", ylabel="test recall",
               xticks=classes, ylim=(0, 1.05))
        ax.legend(fontsize="small", ncols=min(3, len(block)))
    figure.savefig(path, dpi=110)
    return path


def build_report(sweep_dir: str | Path) -> Report:
    """Read `sweep_dir` and aggregate it; writes nothing."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep folder {str(sweep_dir)!r} does not exist or is not a folder")
    runs, pending = load_runs(sweep_dir)
    groups = build_groups(runs)
    present = {m for g in groups for m in g.stats}
    metrics = [m for m in KEY_METRICS if m.key in present]
    problems = [run for run in runs if run.status != "completed"]
    return Report(sweep_dir, groups, verdicts(groups, metrics), metrics, problems, pending, [])


def write_report(sweep_dir: str | Path, console: Console | None = None) -> Report:
    """Aggregate `sweep_dir`; write report.md, report.csv and PNG plots into it; print table and verdicts."""
    report = build_report(sweep_dir)
    out = report.sweep_dir
    plots = [plot_metric_vs_ratio(report, out / "report_metric_vs_ratio.png"),
             plot_class_recall(report, out / "report_class_recall.png")]
    report.files = [write_csv(report, out / "report.csv"), *(p for p in plots if p is not None)]
    (out / "report.md").write_text(markdown(report))
    report.files.insert(0, out / "report.md")
    print_report(report, console or Console(width=None if Console().is_terminal else 150))
    return report


def print_report(report: Report, console: Console) -> None:
    """Table, verdicts, failures grouped by error, unfinished count and the files written."""
    console.rule(f"sweep report: {report.sweep_dir}")
    if report.groups:
        console.print(rich_table(report))
    else:
        console.print(f"[yellow]No completed runs under {report.sweep_dir} yet.[/]")
    for verdict in report.verdicts:
        console.print(f"[bold]verdict[/] {verdict.sentence()}", highlight=False)
    by_error = defaultdict(list)
    for run in report.problems:
        by_error[(run.status, run.error or "")].append(relative(run.path, report.sweep_dir))
    for (status, error), jobs in by_error.items():
        listed = "; ".join(jobs[:3]) + (f"; … {len(jobs) - 3} more (see report.md)" if len(jobs) > 3 else "")
        console.print(f"[red]{status} ×{len(jobs)}[/]: {error}\n  jobs: {listed}", highlight=False)
    if report.pending:
        console.print(f"[yellow]{len(report.pending)} job(s) started but have no metrics.json yet[/]")
    console.print("written: " + ", ".join(str(p) for p in report.files), highlight=False)
