"""Sweep report: every job's `metrics.json` under a folder → groups with intervals → paired comparisons
with a baseline → the terminal table and verdicts, and files in the chosen formats (report.md with PNG
plots, comparisons.csv / report.csv / runs.csv, report.tex, report.html) in the sweep folder or `out`.

Reads files only, never live objects, and treats every file as untrusted data with bounds
(xentlab/lab/report/sweep.py), so it works on a sweep still running or partly failed: completed jobs are
reported, failed, unreadable or malformed ones are listed with the reason, jobs that started but never
finished, or never started (from `multirun.yaml`), are listed too, and a file that breaks a bound is one
line naming it. The statistics are in stats.py and compare.py (docs/statistics.md); tables.py holds the
tables every format renders (render.py, terminal.py), document.py the order report.md and report.html
share.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from xentlab.lab.atomic import atomic_write
from xentlab.lab.report.compare import (
    DEFAULT_BASELINE,
    KEY_METRICS,
    Comparison,
    Comparisons,
    Metric,
    build_groups,
    compare,
    parse_baseline,
    sweep_margins,
)
from xentlab.lab.report.convergence import Convergence, convergence
from xentlab.lab.report.document import FIGURE_CAPTIONS, Figure, document
from xentlab.lab.report.figures import class_axis_label, plot_class_recall, plot_metric_vs_ratio
from xentlab.lab.report.options import Request, metric_named
from xentlab.lab.report.rank import critical_difference_plot, rank_tables
from xentlab.lab.report.recipe import recipe
from xentlab.lab.report.render import to_csv, to_html, to_latex, to_markdown
from xentlab.lab.report.stats import Summary, summarize
from xentlab.lab.report.sweep import (
    MAX_RECORD_BYTES,
    METRICS_FILE,
    Plan,
    Run,
    Untrusted,
    duplicates,
    load_runs,
    never_started,
    read_bounded,
    read_plan,
    relative,
    scan,
    started_jobs,
)
from xentlab.lab.report.tables import Table, tables
from xentlab.lab.report.terminal import console_for_output, print_report, safe

__all__ = ["KEY_METRICS", "METRICS_FILE", "Comparison", "DuplicateRuns", "Metric", "Report", "ReportExists",
           "ReportWriteError", "Request", "Summary", "Table", "Untrusted", "build_report", "class_axis_label",
           "summarize", "write_report"]

MANIFEST = "report.json"  # what a report folder's report was made from, so another is not written over it


class ReportWriteError(OSError):
    """The report was built and printed, but its files could not be written into the sweep folder."""


class DuplicateRuns(ValueError):
    """The folders hold one run twice (same configuration and seed) and no `--dedupe` says which to keep."""


class ReportExists(ValueError):
    """The output folder holds a report made with other options; it is not replaced without --overwrite."""


@dataclass
class Report:
    sweep_dir: Path
    groups: list
    comparisons: Comparisons
    metrics: list
    problems: list
    pending: list
    unstarted: list
    baseline: dict
    convergence: Convergence | None = None
    files: list = field(default_factory=list)
    request: Request = field(default_factory=Request)
    sweeps: list = field(default_factory=list)  # sweep folders read (each with a multirun.yaml)
    plans: list = field(default_factory=list)  # their Plans
    skipped: list = field(default_factory=list)  # `file: reason` for every file not read
    dropped: list = field(default_factory=list)  # (kept, left out) Runs under --dedupe
    tables: list = field(default_factory=list)  # tables added by other modules, in every format they name

    @property
    def complete(self) -> bool:
        """No job failed, was unreadable, is unfinished or never started."""
        return not (self.problems or self.pending or self.unstarted)

    @property
    def warned(self) -> list[Run]:
        return [run for g in self.trained for run in g.runs if run.warnings]

    @property
    def trained(self) -> list:
        """The groups of runs as trained, without the rows derived from their post-hoc metrics (whose runs
        are the baseline's again)."""
        return [g for g in self.groups if g.derived is None]


def build_report(sweep_dir: str | Path, baseline: str | None = None,
                 request: Request | None = None) -> Report:
    """Read `sweep_dir` (a sweep, a run, or a parent folder of several sweeps) and aggregate it; writes
    nothing. `baseline` (e.g. `loss=focal`) names the group every other group is compared with; by
    default the sweep's `report.baseline` setting, else `loss=ce`. `request` chooses metrics, formats and
    what to do with a run recorded twice.

    Raises ValueError when the folder does not exist, holds no metrics.json at all, holds a run twice
    (DuplicateRuns, unless `request.dedupe`) or lacks a requested metric.
    """
    sweep_dir = Path(sweep_dir)
    request = request or Request()
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep folder {str(sweep_dir)!r} does not exist or is not a folder")
    folder = scan(sweep_dir)
    plans = [read_plan(file) for file in folder.plans]
    spec = parse_baseline(baseline or sweep_baseline(sweep_dir, plans) or DEFAULT_BASELINE)
    runs, pending = load_runs(folder)
    if not runs:
        started = f" ({len(pending)} job folder(s) started, none finished)" if pending else ""
        raise ValueError(f"no runs under {str(sweep_dir)!r}: no {METRICS_FILE} at any depth{started}; "
                         "point at a sweep folder such as outputs/multirun/<date>/<time> or a run folder")
    runs, dropped = without_duplicates(runs, request.dedupe)
    groups = build_groups(runs, spec)  # with the baseline's post-hoc variants as rows
    metrics = chosen_metrics(runs, groups, request)
    unstarted = []
    for plan in plans:
        if plan.jobs is not None:
            unstarted += never_started(plan.jobs, started_jobs(folder, runs, plan.sweep_dir))
    skipped = list(dict.fromkeys(folder.skipped + [f"{relative(p.path, sweep_dir)}: {p.problem}"
                                                   for p in plans if p.problem]))
    problems = [run for run in runs if run.status != "completed"]
    comparisons = compare(groups, metrics, spec, sweep_margins(plans))
    trained = [g for g in groups if g.derived is None]
    return Report(sweep_dir, groups, comparisons, metrics, problems, pending, unstarted, spec,
                  convergence(trained, spec), request=request,
                  sweeps=[p.sweep_dir for p in plans], plans=plans, skipped=skipped, dropped=dropped,
                  tables=rank_tables(groups, metrics))


def sweep_baseline(sweep_dir: Path, plans: list[Plan]) -> str | None:
    """The `report.baseline` the sweep was launched with: the folder's own multirun.yaml, else the one
    every sweep under it agrees on."""
    own = [p.baseline for p in plans if p.sweep_dir == sweep_dir]
    found = own or list({p.baseline for p in plans})
    return found[0] if len(found) == 1 else None


def without_duplicates(runs: list[Run], dedupe: str | None) -> tuple[list[Run], list[tuple[Run, Run]]]:
    """`runs` with each run recorded twice kept once (`dedupe` "first" or "last" in path order), and the
    (kept, left out) pairs; DuplicateRuns naming the copies when `dedupe` is None."""
    copies = duplicates(runs)
    if not copies:
        return runs, []
    if dedupe is None:
        shown = "; ".join(" and ".join(str(r.path) for r in same) for same in copies[:3])
        more = f"; … {len(copies) - 3} more" if len(copies) > 3 else ""
        raise DuplicateRuns(f"{len(copies)} run(s) recorded more than once with the same configuration and "
                            f"seed, which would count them twice: {shown}{more}. Keep one copy of each with "
                            "--dedupe first or --dedupe last (in path order), or report the folders apart")
    dropped = []
    for same in copies:
        kept = same[0] if dedupe == "first" else same[-1]
        dropped += [(kept, run) for run in same if run is not kept]
    left_out = {id(run) for _, run in dropped}
    return [run for run in runs if id(run) not in left_out], dropped


def chosen_metrics(runs: list[Run], groups: list, request: Request) -> list[Metric]:
    """The metrics the report compares: the requested ones (each recorded by some completed run), else the
    key metrics the groups have."""
    if request.metrics is None:
        present = {m for g in groups for m in g.stats}
        return [m for m in KEY_METRICS if m.key in present]
    recorded = {k for run in runs if run.status == "completed" for k in run.metrics}
    missing = [key for key in request.metrics if key not in recorded]
    if missing:
        available = sorted(k for k in recorded if k.startswith("test/"))
        raise ValueError(f"--metrics {', '.join(missing)}: no completed run here recorded "
                         f"{'it' if len(missing) == 1 else 'them'}; the test metrics recorded are "
                         f"{', '.join(available) or 'none'}")
    return [metric_named(key) for key in request.metrics]


def options(report: Report, out: Path) -> dict:
    """What makes two reports of one folder the same report: the sweep read (relative to the output
    folder, so moving both together keeps it), the baseline, the metrics and the dedupe choice."""
    return {"sweep": os.path.relpath(report.sweep_dir.resolve(), out.resolve()),
            "baseline": ",".join(f"{k}={v}" for k, v in report.baseline.items()),
            "metrics": [m.key for m in report.metrics], "dedupe": report.request.dedupe}


def previous_options(out: Path) -> dict | None:
    """The options the report already in `out` was made with; None when there is none or it is unreadable."""
    try:
        recorded = json.loads(read_bounded(out / MANIFEST, MAX_RECORD_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    found = recorded.get("options") if isinstance(recorded, dict) else None
    return found if isinstance(found, dict) else None


def check_out(report: Report, out: Path, overwrite: bool) -> str | None:
    """ReportExists when `out` holds a report made with other options (unless `overwrite`); else a note to
    print when a report whose options are unknown (no report.json, an older xentlab) will be replaced."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    mine, before = options(report, out), previous_options(out)
    if before is not None and before != mine and not overwrite:
        changed = ", ".join(f"{key} {json.dumps(before.get(key))} → {json.dumps(value)}"
                            for key, value in mine.items() if before.get(key) != value)
        raise ReportExists(f"{out} holds a report made with other options ({changed}); write this one "
                           "elsewhere with --out DIR, or replace it with --overwrite")
    if before is None and (out / "report.md").exists():
        return f"replacing the report in {out}, whose options were not recorded"
    if before is not None and before != mine:
        return f"replacing the report in {out} made with other options (--overwrite)"
    return None


def figures(report: Report) -> list[Figure]:
    """The plots that carry information for this report, as PNG bytes with their captions."""
    found = []
    for name, draw in (("report_metric_vs_ratio", plot_metric_vs_ratio),
                       ("report_class_recall", plot_class_recall), ("report_cd", critical_difference_plot)):
        figure = draw(report)
        if figure is not None:
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=110)
            found.append(Figure(f"{name}.png", buffer.getvalue(), FIGURE_CAPTIONS[name]))
    return found


def report_files(report: Report) -> dict[str, str | bytes]:
    """File name → content: the CSVs always (the data every document is made from), then the documents
    the report's request names."""
    kinds = report.request.formats
    every = tables(report)
    files: dict[str, str | bytes] = {f"{t.name}.csv": to_csv(t) for t in every
                                     if "csv" in t.formats and t.name}
    plots = figures(report) if {"md", "html"} & set(kinds) else []
    if "md" in kinds:
        files |= {figure.name: figure.png for figure in plots}
        files["report.md"] = to_markdown(document(report, plots, "md"))
    if "latex" in kinds:
        files["report.tex"] = to_latex(every, recipe(report), str(report.sweep_dir))
    if "html" in kinds:
        files["report.html"] = to_html(document(report, plots, "html"), f"xentlab report: {report.sweep_dir}")
    return files


def write_report(sweep_dir: str | Path, console: Console | None = None, baseline: str | None = None, *,
                 request: Request | None = None, out: str | Path | None = None,
                 overwrite: bool = False) -> Report:
    """Aggregate `sweep_dir`, print the table and verdicts, then write the requested files into `out`
    (default: the sweep folder), each atomically (temporary file + rename in the folder), and report.json,
    the options they were made with.

    Refuses (ReportExists, before anything is printed) to replace a report in `out` made with other
    options unless `overwrite`. A folder that cannot be written still gets the printed report; then
    ReportWriteError says why.
    """
    report = build_report(sweep_dir, baseline, request)
    out = Path(out) if out is not None else report.sweep_dir
    note = check_out(report, out, overwrite)
    console = console or console_for_output()
    print_report(report, console)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = [atomic_write(out / name, content) for name, content in report_files(report).items()]
        manifest = {"options": options(report, out), "formats": list(report.request.formats),
                    "files": sorted(p.name for p in written)}
        written.append(atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n"))
    except OSError as error:
        raise ReportWriteError(f"could not write the report into {out}: {error.strerror or error}; the "
                               "table above is complete; rerun `xentlab report` with --out on a writable "
                               "folder") from error
    report.files = written
    if note:
        console.print(f"[yellow]{safe(note)}[/]", highlight=False)
    console.print("written: " + safe(", ".join(str(p) for p in report.files)), highlight=False)
    return report


