"""Sweep report: every job's `metrics.json` under a folder → groups with intervals → paired comparisons
with a baseline → table, verdicts, comparisons.csv, report.csv, report.md and plots in the sweep folder.

Reads files only, never live objects, and treats every file as untrusted data (xentlab/lab/report/sweep.py),
so it works on a sweep still running or partly failed: completed jobs are reported, failed, unreadable or
malformed ones are listed with the reason, and jobs that started but never finished, or never started
(from `multirun.yaml`), are listed too. The statistics are in xentlab/lab/report/stats.py and
docs/statistics.md.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from xentlab.lab.atomic import atomic_write
from xentlab.lab.report.compare import (
    COLUMNS,
    DEFAULT_BASELINE,
    KEY_METRICS,
    MINORITY,
    Comparison,
    Comparisons,
    Group,
    Metric,
    build_groups,
    compare,
    describe,
    margins,
    parse_baseline,
    verdict_lines,
)
from xentlab.lab.report.convergence import Convergence, convergence
from xentlab.lab.report.figures import class_axis_label, plot_class_recall, plot_metric_vs_ratio
from xentlab.lab.report.rank import outputs as rank_outputs
from xentlab.lab.report.stats import MIN_SEEDS, NO_RUNS, Summary, summarize
from xentlab.lab.report.sweep import (
    METRICS_FILE,
    PLANNED_FILE,
    Run,
    load_runs,
    never_started,
    planned_jobs,
    started_jobs,
)

__all__ = ["KEY_METRICS", "METRICS_FILE", "Comparison", "Metric", "Report", "ReportWriteError", "Summary",
           "build_report", "class_axis_label", "summarize", "write_report"]

class ReportWriteError(OSError):
    """The report was built and printed, but its files could not be written into the sweep folder."""


@dataclass
class Report:
    sweep_dir: Path
    groups: list
    comparisons: Comparisons
    metrics: list
    problems: list
    pending: list
    unstarted: list
    grid_note: str
    baseline: dict
    convergence: Convergence | None = None
    files: list = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """No job failed, was unreadable, is unfinished or never started."""
        return not (self.problems or self.pending or self.unstarted)

    @property
    def warned(self) -> list[Run]:
        return [run for g in self.groups for run in g.runs if run.warnings]


def build_report(sweep_dir: str | Path, baseline: str | None = None) -> Report:
    """Read `sweep_dir` and aggregate it; writes nothing. `baseline` (e.g. `loss=focal`) names the group
    every other group is compared with; by default the sweep's `report.baseline` setting, else `loss=ce`.

    Raises ValueError when the folder does not exist or holds no metrics.json at all.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep folder {str(sweep_dir)!r} does not exist or is not a folder")
    spec = parse_baseline(baseline or sweep_baseline(sweep_dir) or DEFAULT_BASELINE)
    runs, pending = load_runs(sweep_dir)
    if not runs:
        started = f" ({len(pending)} job folder(s) started, none finished)" if pending else ""
        raise ValueError(f"no runs under {str(sweep_dir)!r}: no {METRICS_FILE} at any depth{started}; "
                         "point at a sweep folder such as outputs/multirun/<date>/<time> or a run folder")
    groups = build_groups(runs, spec)
    present = {m for g in groups for m in g.stats}
    metrics = [m for m in KEY_METRICS if m.key in present]
    planned, note = planned_jobs(sweep_dir)
    unstarted = never_started(planned, started_jobs(sweep_dir, runs)) if planned is not None else []
    problems = [run for run in runs if run.status != "completed"]
    comparisons = compare(groups, metrics, spec, margins(sweep_setting(sweep_dir, "sesoi")))
    return Report(sweep_dir, groups, comparisons, metrics, problems, pending, unstarted,
                  note, spec, convergence([g for g in groups if g.derived is None], spec))


def sweep_setting(sweep_dir: Path, name: str):
    """The sweep's `report.<name>` setting (from multirun.yaml), None when absent or unreadable."""
    import yaml

    try:
        return yaml.safe_load((sweep_dir / PLANNED_FILE).read_text())["report"][name]
    except Exception:  # noqa: BLE001 - no file, no key or a bad file: the default applies
        return None


def sweep_baseline(sweep_dir: Path) -> str | None:
    """The `report.baseline` the sweep was launched with (from multirun.yaml), if any."""
    value = sweep_setting(sweep_dir, "baseline")
    return value if isinstance(value, str) else None


def write_report(sweep_dir: str | Path, console: Console | None = None,
                 baseline: str | None = None) -> Report:
    """Aggregate `sweep_dir`, print the table and verdicts, then write report.md, report.csv,
    comparisons.csv and PNG plots into it, each atomically (temporary file + rename in the folder).

    A folder that cannot be written still gets the printed report; then ReportWriteError says why.
    """
    report = build_report(sweep_dir, baseline)
    console = console or Console(width=None if Console().is_terminal else 150)
    print_report(report, console)
    out = report.sweep_dir
    try:
        written = [atomic_write(out / "comparisons.csv", comparisons_csv(report)),
                   atomic_write(out / "report.csv", groups_csv(report))]
        for name, draw in (("report_metric_vs_ratio.png", plot_metric_vs_ratio),
                           ("report_class_recall.png", plot_class_recall)):
            figure = draw(report)
            if figure is not None:
                written.append(atomic_write(out / name, figure_bytes(figure)))
        for name, made in rank_outputs(report.groups, report.metrics).items():  # rankings, aggregate, CD
            written.append(atomic_write(out / name, csv_text(made) if name.endswith(".csv")
                                        else figure_bytes(made)))
        report.files = written
        report.files.insert(0, atomic_write(out / "report.md", markdown(report)))
    except OSError as error:
        raise ReportWriteError(f"could not write the report into {out}: {error.strerror or error}; the "
                               "table above is complete; rerun `xentlab report` on a writable copy"
                               ) from error
    console.print("written: " + ", ".join(str(p) for p in report.files), highlight=False)
    return report


def figure_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def csv_text(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def comparisons_csv(report: Report) -> str:
    """comparisons.csv: one row per comparison with a baseline; verdicts, ★ and report.md follow from it."""
    records = [c.record() for c in report.comparisons.items]
    if not records:
        return csv_text([list(COLUMNS)])
    return csv_text([list(records[0])] + [list(r.values()) for r in records])


def groups_csv(report: Report) -> str:
    """report.csv: one row per group with its settings and, per test metric, mean, 95% interval, std, n."""
    keys = sorted({k for g in report.groups for k in g.settings})
    names = sorted({m for g in report.groups for m in g.stats if m.startswith("test/")})
    rows = [["context", "group", "baseline", *keys, "n"]
            + [f"{m}_{part}" for m in names for part in ("mean", "ci_low", "ci_high", "std", "n")]]
    for g in report.groups:
        values = []
        for m in names:
            s = g.stats.get(m, NO_RUNS)
            values += [s.mean, s.low, s.high, s.std, s.n]
        rows.append([g.context, g.label, str(g.is_baseline).lower(), *(g.settings.get(k, "") for k in keys),
                     len(g.runs), *values])
    return csv_text(rows)


def marks(report: Report) -> dict[tuple[int, str], str]:
    """(group id, metric key) → "★" where the group is significantly better than the baseline, "▼" worse."""
    found = {}
    for c in report.comparisons.items:
        if c.decision in ("better", "worse") and c.headline:
            found[(id(c.group), c.metric.key)] = "★" if c.better else "▼"
    return found


def cell(group: Group, metric: Metric) -> str:
    """`mean [low, high]`, with `(n=k)` when fewer of the group's runs reported the metric; `—` if none."""
    summary = group.stats.get(metric.key)
    if summary is None or summary.n == 0:
        return "—"
    text = summary.text()
    return text if summary.n == len(group.runs) else f"{text} (n={summary.n})"


def table_rows(report: Report) -> list[tuple[list[str], list[str]]]:
    """Per group: the cells [context, group, n, metric...] and each metric cell's mark ("", "★", "▼")."""
    found = marks(report)
    return [([g.context, g.label + (" (baseline)" if g.is_baseline else ""), str(len(g.runs))]
             + [cell(g, m) for m in report.metrics],
             [found.get((id(g), m.key), "") for m in report.metrics]) for g in report.groups]


def title(report: Report) -> str:
    base = ",".join(f"{k}={v}" for k, v in report.baseline.items())
    return (f"mean [95% CI] over seeds; ★ / ▼ significantly better / worse than {base} (or the verdict's "
            f"stronger post-hoc baseline) "
            f"(paired, Holm-adjusted p < 0.05, ≥ {MIN_SEEDS} seeds)")


def rich_table(report: Report) -> Table:
    """The console table: one row per group, one section per context, marked cells."""
    table = Table(title=title(report), title_justify="left")
    has_context = any(g.context for g in report.groups)
    if has_context:
        table.add_column("context", overflow="fold")
    table.add_column("loss / run", overflow="fold")
    table.add_column("n", justify="right")
    for metric in report.metrics:
        table.add_column(metric.heading, justify="right", no_wrap=True)
    rows = table_rows(report)
    style = {"★": "bold green", "▼": "red"}
    for i, (cells, signs) in enumerate(rows):
        values = [f"[{style[s]}]{s} {escape(c)}[/]" if s else escape(c)
                  for c, s in zip(cells[3:], signs, strict=True)]
        last_in_block = i + 1 == len(rows) or report.groups[i + 1].context != report.groups[i].context
        shown = cells[:3] if has_context else cells[1:3]
        table.add_row(*map(escape, shown), *values, end_section=last_in_block)
    return table


def markdown(report: Report) -> str:
    """report.md: the verdicts (the answer), the table, convergence, problems and the plots."""
    done = sum(len(g.runs) for g in report.groups)
    lines = [f"# Sweep report: `{report.sweep_dir}`", "",
             f"{done} completed runs in {len(report.groups)} groups, {len(report.problems)} failed or "
             f"incomplete (failed, interrupted, unreadable or malformed), {len(report.pending)} started but "
             f"never finished, {len(report.unstarted)} never started.",
             ""]
    said = [f"- {line}" for line in verdict_lines(report.comparisons)] or ["- (nothing to compare)"]
    lines += ["## Verdicts", "", "Each loss against the baseline on matched seeds: mean paired difference "
              "[simultaneous 95% interval over all comparisons below], seeds in that direction, "
              "Holm-adjusted p over every comparison below; equivalent: shown within the metric's margin ±δ "
              "(comparisons.csv; method in docs/statistics.md).", "", *said]
    lead = slice(0 if any(g.context for g in report.groups) else 1, 3)
    headings = ["context", "loss / run", "n"][lead] + [m.heading for m in report.metrics]
    lines += ["", "## Results", "", title(report) + ". Intervals are Student t, clipped to the metric's "
              "range.", "", "| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    for cells, signs in table_rows(report):
        values = [f"**{s} {c}**" if s else c for c, s in zip(cells[3:], signs, strict=True)]
        lines.append("| " + " | ".join(cells[lead] + values) + " |")
    recorded = {k for g in report.groups for run in g.runs for k in run.metrics}
    missing = [m.key for m in KEY_METRICS if m not in report.metrics and m.key not in recorded]
    if missing:
        lines += ["", f"Not reported by these runs: {', '.join(missing)}."]
    if MINORITY in recorded and not all(MINORITY in g.stats for g in report.groups):
        lines += ["", "Minority recall is left out where the classes have equal sizes (imbalance ratio 1): "
                  "there it would name an arbitrary class."]
    if report.convergence is not None:
        lines += ["", *report.convergence.markdown()]
    lines += problem_lines(report)
    pngs = [p for p in report.files if p.suffix == ".png"]
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(lines) + "\n"


def problem_lines(report: Report) -> list[str]:
    """Markdown for failed, unreadable, malformed or interrupted jobs, warnings, unfinished and unstarted."""
    lines = []
    if report.problems:
        lines += ["", "## Failed, unreadable or incomplete jobs", "", "| job | status | reason |",
                  "|---|---|---|"]
        for run in report.problems:
            lines.append(f"| {relative(run.path, report.sweep_dir)} | {run.status} | {md_cell(run.error)} |")
    if report.warned:
        lines += ["", "## Runs with warnings (included in the results)", ""]
        lines += [f"- {relative(run.path, report.sweep_dir)}: {md_cell('; '.join(run.warnings))}"
                  for run in report.warned]
    if report.pending:
        lines += ["", "## Started but never finished (no metrics.json)", ""]
        lines += [f"- {relative(p, report.sweep_dir)}" for p in report.pending]
    if report.unstarted:
        lines += ["", f"## Never started (planned in {PLANNED_FILE})", ""]
        lines += [f"- {describe(job, list(job))}" for job in report.unstarted]
    if not report.complete:
        lines += ["", f"Groups with missing jobs are compared on the seeds they share with the baseline; a "
                  f"claim needs ≥ {MIN_SEEDS} of them."]
    return lines


def md_cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def relative(path: Path, root: Path) -> str:
    """`path` relative to the sweep folder, for short job names."""
    return str(path.relative_to(root)) if path != root else "."


def print_report(report: Report, console: Console) -> None:
    """Table, verdicts, problems grouped by reason, unfinished and unstarted jobs."""
    console.rule(f"sweep report: {escape(str(report.sweep_dir))}")
    if report.groups:
        console.print(rich_table(report))
    else:
        console.print(f"[yellow]No completed runs under {escape(str(report.sweep_dir))}.[/]")
    for line in verdict_lines(report.comparisons):
        console.print(f"[bold]verdict[/] {escape(line)}", highlight=False)
    if report.convergence is not None:
        for line in report.convergence.lines():
            console.print(escape(line), highlight=False)
    by_error = defaultdict(list)
    for run in report.problems:
        by_error[(run.status, run.error or "")].append(relative(run.path, report.sweep_dir))
    for (status, error), jobs in by_error.items():
        listed = "; ".join(jobs[:3]) + (f"; … {len(jobs) - 3} more (see report.md)" if len(jobs) > 3 else "")
        console.print(f"[red]{status} ×{len(jobs)}[/]: {escape(error)}\n  jobs: {escape(listed)}",
                      highlight=False)
    for run in report.warned:
        console.print(f"[yellow]warning[/] {escape(relative(run.path, report.sweep_dir))}: "
                      f"{escape('; '.join(run.warnings))}", highlight=False)
    if report.pending:
        console.print(f"[yellow]{len(report.pending)} job(s) started but have no metrics.json[/]")
    if report.unstarted:
        shown = "; ".join(describe(job, list(job)) for job in report.unstarted[:5])
        more = f"; … {len(report.unstarted) - 5} more (see report.md)" if len(report.unstarted) > 5 else ""
        console.print(f"[yellow]{len(report.unstarted)} planned job(s) never started[/]: "
                      f"{escape(shown + more)}",
                      highlight=False)

