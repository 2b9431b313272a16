"""The report in the terminal (rich): the results table, verdicts and problems.

The table keeps every label readable at any width: when the whole table does not fit, each context gets
its own table (the context as its title) and the metric columns are split over as many tables as the
width needs, each repeating the loss labels; a label longer than its share still wraps, never shrinks to
nothing. Text from the folder is printed with rich's markup escaped and control characters (ANSI escapes,
newlines) blanked, so it cannot restyle or clear the terminal.
"""

from __future__ import annotations

import os
from collections import defaultdict

from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from xentlab.lab.report.compare import describe, verdict_lines
from xentlab.lab.report.render import SIGNS, one_line, value_text
from xentlab.lab.report.sweep import relative
from xentlab.lab.report.tables import BETTER, Marked, results_table, tuning_table

PIPED_WIDTH = 150  # output to a file or pipe without COLUMNS: wide, as nothing wraps it again
MIN_LABEL = 12  # a label column is never narrower than this; longer labels wrap
STYLE = {BETTER: "bold green"}


def console_for_output() -> Console:
    """A console at the terminal's width, COLUMNS when set, else PIPED_WIDTH."""
    terminal = Console().is_terminal
    return Console(width=None if terminal or os.environ.get("COLUMNS", "").isdigit() else PIPED_WIDTH)


def safe(text: object) -> str:
    """Folder text for rich: control characters blanked, markup escaped."""
    return escape(one_line(str(text)))


def styled(value: object) -> str:
    if isinstance(value, Marked) and value.mark:
        return f"[{STYLE.get(value.mark, 'red')}]{safe(value_text(value))}[/]"
    return safe(value_text(value))


def needed(cells: list[str]) -> int:
    return max((len(c) for c in cells), default=0)


def chunks(widths: list[int], room: int) -> list[list[int]]:
    """Column indices split greedily into runs whose widths (plus 3 characters each for padding and rule)
    fit in `room`; at least one column per run."""
    runs, current, used = [], [], 0
    for i, width in enumerate(widths):
        if current and used + width + 3 > room:
            runs.append(current)
            current, used = [], 0
        current.append(i)
        used += width + 3
    return runs + ([current] if current else [])


def rich_tables(report, width: int) -> list[RichTable]:
    """The results table as one rich table if it fits `width`, else one per context and metric chunk.

    Widths are planned here, not left to rich: rich shrinks every column evenly when a table is too wide,
    down to nothing. Each column's minimum is its longest cell (a metric's heading may wrap at spaces),
    and the tables are cut so that the minimums fit.
    """
    table = results_table(report)
    first = 1 if table.columns[0] == "context" else 0

    def longest(index: int) -> int:
        cells = needed([value_text(row[index]) for row in table.rows])
        words = max(len(word) for word in table.columns[index].split())
        return max(cells, words if index >= first + 2 else len(table.columns[index]))

    widths = {i: longest(i) for i in range(len(table.columns))}
    metrics = list(range(first + 2, len(table.columns)))
    if sum(w + 3 for w in widths.values()) + 1 <= width:
        return [build(report_title(report), table, list(widths), widths, context=bool(first))]
    # Too wide: a table per context (its name as the title), the metrics split to fit beside the labels.
    label = first
    widths[label] = max(MIN_LABEL, min(widths[label], width // 3))
    room = width - 1 - (widths[label] + 3) - (widths[label + 1] + 3)
    parts = chunks([widths[i] for i in metrics], room)
    by_context = defaultdict(list)
    for index, row in enumerate(table.rows):
        by_context[row[0] if first else ""].append(index)
    found = []
    for context, indices in by_context.items():
        for n, part in enumerate(parts):
            title = context or report_title(report)
            if len(parts) > 1:
                title += f"  (metrics {n + 1}/{len(parts)})"
            columns = [label, label + 1] + [metrics[i] for i in part]
            found.append(build(title, table, columns, widths, rows=indices, label_width=widths[label]))
    return found


def report_title(report) -> str:
    base = ",".join(f"{k}={v}" for k, v in report.baseline.items())
    return (f"mean [95% CI] over seeds; ★ / ▼ significantly better / worse than {base} or the metric's "
            "stronger post-hoc baseline named in the verdicts (Holm-adjusted, paired)")


def build(title: str, table, columns: list[int], widths: dict[int, int], *, rows: list[int] | None = None,
          context: bool = False, label_width: int | None = None) -> RichTable:
    """A rich table of the chosen columns and rows; a label column folds at `label_width` when given."""
    shown = RichTable(title=safe(title), title_justify="left")
    for index in columns:
        name = table.columns[index]
        if name in ("context", "loss / run") and label_width is not None:
            shown.add_column(safe(name), overflow="fold", min_width=min(MIN_LABEL, label_width),
                             max_width=label_width)
        elif name in ("context", "loss / run", "n"):
            shown.add_column(safe(name), justify="right" if name == "n" else "left", no_wrap=True,
                             min_width=widths[index])
        else:  # a metric: its cells never wrap, its heading may
            shown.add_column(safe(name), justify="right", overflow="fold", min_width=widths[index])
    chosen = rows if rows is not None else range(len(table.rows))
    last = max(chosen, default=0)
    for i in chosen:
        row = table.rows[i]
        end = context and (i == last or (i + 1) in table.blocks)
        shown.add_row(*(styled(row[index]) for index in columns), end_section=end)
    return shown


def print_report(report, console: Console) -> None:
    """Table(s), verdicts, sweeps read, problems grouped by reason, files not read, unfinished and
    unstarted jobs."""
    from xentlab.lab.report.document import sources

    console.rule(f"sweep report: {safe(report.sweep_dir)}")
    read = sources(report)
    for line in read[:5]:
        console.print(safe(line), highlight=False)
    if len(read) > 5:
        console.print(f"… {len(read) - 5} more (see report.md)", highlight=False)
    if report.groups:
        for table in rich_tables(report, console.width):
            console.print(table)
    else:
        console.print(f"[yellow]No completed runs under {safe(report.sweep_dir)}.[/]")
    for line in verdict_lines(report.comparisons):
        console.print(f"[bold]verdict[/] {safe(line)}", highlight=False)
    tuned = tuning_table(report)
    for context, label, chosen, objective, score, *_ in tuned.rows if tuned is not None else []:
        where = f"{context}, " if context else ""
        console.print(f"[bold]tuned[/] {safe(where + label)}: {safe(chosen)} ({safe(objective)} "
                      f"{safe(score)} on tuning seeds)", highlight=False)
    if report.convergence is not None:
        for line in report.convergence.lines():
            console.print(safe(line), highlight=False)
    by_error = defaultdict(list)
    for run in report.problems:
        by_error[(run.status, run.error or "")].append(relative(run.path, report.sweep_dir))
    for (status, error), jobs in by_error.items():
        listed = "; ".join(jobs[:3]) + (f"; … {len(jobs) - 3} more (see report.md)" if len(jobs) > 3 else "")
        console.print(f"[red]{safe(status)} ×{len(jobs)}[/]: {safe(error)}\n  jobs: {safe(listed)}",
                      highlight=False)
    for run in report.warned:
        console.print(f"[yellow]warning[/] {safe(relative(run.path, report.sweep_dir))}: "
                      f"{safe('; '.join(run.warnings))}", highlight=False)
    for line in report.skipped:
        console.print(f"[yellow]not read[/] {safe(line)}", highlight=False)
    if report.pending:
        console.print(f"[yellow]{len(report.pending)} job(s) started but have no metrics.json[/]")
    if report.unstarted:
        shown = "; ".join(describe(job, list(job)) for job in report.unstarted[:5])
        more = f"; … {len(report.unstarted) - 5} more (see report.md)" if len(report.unstarted) > 5 else ""
        console.print(f"[yellow]{len(report.unstarted)} planned job(s) never started[/]: "
                      f"{safe(shown + more)}", highlight=False)


__all__ = ["SIGNS", "console_for_output", "print_report", "rich_tables"]
