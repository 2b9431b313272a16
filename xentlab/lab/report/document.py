"""The report as one document, a list of blocks (headings, paragraphs, bullet lists, tables, figures) that
report.md and report.html both render (xentlab/lab/report/render.py), so the two say the same things in
the same order. Text in blocks is plain; each renderer escapes it for its format.
"""

from __future__ import annotations

from dataclasses import dataclass

from xentlab.lab.report.compare import describe, verdict_lines
from xentlab.lab.report.figures import ERROR_BARS
from xentlab.lab.report.recipe import recipe
from xentlab.lab.report.stats import MIN_SEEDS
from xentlab.lab.report.sweep import PLANNED_FILE, relative
from xentlab.lab.report.tables import Table, tables


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Figure:
    """A plot: its PNG file's name (report.md links it, report.html embeds the bytes) and its caption."""

    name: str
    png: bytes
    caption: str


def summary(report) -> str:
    done = sum(len(g.runs) for g in report.trained)
    return (f"{done} completed runs in {len(report.trained)} groups, {len(report.problems)} failed or "
            f"incomplete (failed, interrupted, unreadable or malformed), {len(report.pending)} started but "
            f"never finished, {len(report.unstarted)} never started.")


def sources(report) -> list[str]:
    """Which sweeps the report read and, under --dedupe, which copies of a run recorded twice it left
    out: a sentence, then one line per copy."""
    lines = []
    if len(report.sweeps) > 1:
        names = ", ".join(relative(s, report.sweep_dir) for s in report.sweeps)
        lines.append(f"Read {len(report.sweeps)} sweeps: {names}.")
    if report.dropped:
        lines.append(f"{len(report.dropped)} run(s) recorded more than once (same configuration and seed); "
                     f"one copy of each kept (--dedupe {report.request.dedupe}, in path order):")
    for kept, dropped in report.dropped:
        kept_at, left_at = relative(kept.path, report.sweep_dir), relative(dropped.path, report.sweep_dir)
        lines.append(f"kept {kept_at}, left out {left_at}")
    return lines


def setup_table(report) -> Table:
    return Table("", "Set-up", ["item", "value"], [list(row) for row in recipe(report)],
                 frozenset({"md", "html"}),
                 "Read from the runs' recorded configs and versions and the sweeps' multirun.yaml.")


def problem_blocks(report) -> list:
    """Failed, unreadable or malformed jobs, warnings, unfinished and unstarted jobs, files not read."""
    blocks = []
    if report.warned:
        blocks += [Heading(2, "Runs with warnings (included in the results)"),
                   Bullets(tuple(f"{relative(run.path, report.sweep_dir)}: {'; '.join(run.warnings)}"
                                 for run in report.warned))]
    if report.pending:
        blocks += [Heading(2, "Started but never finished (no metrics.json)"),
                   Bullets(tuple(relative(p, report.sweep_dir) for p in report.pending))]
    if report.unstarted:
        blocks += [Heading(2, f"Never started (planned in {PLANNED_FILE})"),
                   Bullets(tuple(describe(job, list(job)) for job in report.unstarted))]
    if report.skipped:
        blocks += [Heading(2, "Files not read"),
                   Paragraph("Each breaks a bound the report reads a folder within (docs/trust.md); the rest "
                             "of the folder is reported as usual."),
                   Bullets(tuple(report.skipped))]
    if not report.complete:
        blocks.append(Paragraph(f"Groups with missing jobs are compared on the seeds they share with the "
                                f"baseline; a claim needs ≥ {MIN_SEEDS} of them."))
    return blocks


def section(table: Table, fmt: str) -> list:
    """A table's heading, caption, rows and notes, where its formats include `fmt`."""
    if fmt not in table.formats:
        return []
    return ([Heading(2, table.title)] + ([Paragraph(table.caption)] if table.caption else []) + [table]
            + ([Bullets(tuple(table.notes))] if table.notes else []))


def document(report, figures: list[Figure], fmt: str) -> list:
    """Every block of the report in format `fmt` ("md" or "html"): the answer (verdicts) first, then the
    evidence; a table appears where its `formats` include `fmt`."""
    read = sources(report)
    copies = read[-len(report.dropped):] if report.dropped else []
    blocks = [Heading(1, f"Sweep report: {report.sweep_dir}"), Paragraph(summary(report)),
              *(Paragraph(line) for line in read[:len(read) - len(copies)])]
    if copies:
        blocks.append(Bullets(tuple(copies)))
    said = verdict_lines(report.comparisons) or ["(nothing to compare)"]
    verdicts = [Heading(2, "Verdicts"),
                Paragraph("Each loss against the baseline on matched seeds: mean paired difference "
                          "[simultaneous 95% interval over every comparison below], seeds in that direction, "
                          "Holm-adjusted p over every comparison below; equivalent: shown to lie within the "
                          "metric's margin ±δ (comparisons.csv; method in docs/statistics.md)."),
                Bullets(tuple(said))]
    blocks += section(setup_table(report), fmt) + verdicts
    for table in tables(report):
        blocks += section(table, fmt)
    blocks += problem_blocks(report)
    if figures:
        blocks.append(Heading(2, "Plots"))
        blocks += figures
    return blocks


FIGURE_CAPTIONS = {
    "report_metric_vs_ratio": "Each metric against the imbalance ratio, one line per loss (colour by loss, "
                              "the same in every report; the baseline thick and edged in black); "
                              + ERROR_BARS + ".",
    "report_class_recall": "Test recall of each class, one bar per loss (colour by loss; the baseline "
                           "hatched); " + ERROR_BARS + ".",
    "report_cd": "Critical-difference diagram per metric: each loss at its average rank over the contexts "
                 "(1 = best); thick bars join losses that pairwise Wilcoxon signed-rank tests over contexts "
                 "with Holm cannot tell apart (docs/statistics.md).",
}
