"""The report's tables as plain data, one `Table` each, rendered alike by every format (xentlab/lab/report
/render.py): a table names the formats that show it, so a new table (or a new column in a comparison's
record) reaches the terminal, report.md, report.tex, report.html and its CSV without format-specific code.

Cells are plain values (str, int, float, bool, None) or `Marked` (a result with its significance mark);
renderers escape text for their format and write numbers in full precision to CSV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xentlab.lab.report.compare import COLUMNS, KEY_METRICS, MINORITY, Comparison, Group, Metric
from xentlab.lab.report.stats import MIN_SEEDS, NO_RUNS
from xentlab.lab.report.sweep import relative

BETTER, WORSE = "better", "worse"


@dataclass(frozen=True)
class Marked:
    """A table cell with a significance mark: "" (none), BETTER or WORSE than the baseline."""

    text: str
    mark: str = ""


@dataclass
class Table:
    """One table: `name` is its CSV file's stem (report.csv, comparisons.csv, ...), `formats` where it
    appears (any of terminal, md, csv, latex, html), `caption` a sentence under its title."""

    name: str
    title: str
    columns: list[str]
    rows: list[list]
    formats: frozenset = frozenset({"md", "html"})
    caption: str = ""
    blocks: list[int] = field(default_factory=list)  # row indices that start a new block (a context)
    notes: list[str] = field(default_factory=list)  # sentences shown under the table


def cell(group: Group, metric: Metric) -> str:
    """`mean [low, high]`, with `(n=k)` when fewer of the group's runs reported the metric; `—` if none."""
    summary = group.stats.get(metric.key)
    if summary is None or summary.n == 0:
        return "—"
    text = summary.text()
    return text if summary.n == len(group.runs) else f"{text} (n={summary.n})"


def marks(comparisons: list[Comparison]) -> dict[tuple[int, str], str]:
    """(group id, metric key) → BETTER / WORSE where the group is decided better / worse than the metric's
    headline baseline."""
    return {(id(c.group), c.metric.key): c.decision for c in comparisons
            if c.headline and c.decision in (BETTER, WORSE)}


def baseline_text(report) -> str:
    return ",".join(f"{k}={v}" for k, v in report.baseline.items())


def results_caption(report) -> str:
    return (f"Mean [95% CI] over seeds (Student t, clipped to the metric's range); ★ / ▼ decided better / "
            f"worse than {baseline_text(report)} or the metric's stronger post-hoc baseline named in the "
            f"verdicts (paired on seeds, Holm-adjusted p < 0.05, "
            f"≥ {MIN_SEEDS} seeds).")


def results_table(report) -> Table:
    """One row per group (the baseline labelled), one column per reported metric, marked cells."""
    found = marks(report.comparisons.items)
    with_context = any(g.context for g in report.groups)
    columns = ((["context"] if with_context else []) + ["loss / run", "n"]
               + [m.heading for m in report.metrics])
    rows, blocks = [], []
    for i, g in enumerate(report.groups):
        if i == 0 or g.context != report.groups[i - 1].context:
            blocks.append(i)
        # A post-hoc row's label (`loss=ce+posthoc_la`) already says whose runs it reads.
        label = g.label + (" (baseline)" if g.is_baseline and g.derived is None else "")
        rows.append(([g.context] if with_context else []) + [label, len(g.runs)]
                    + [Marked(cell(g, m), found.get((id(g), m.key), "")) for m in report.metrics])
    return Table("", "Results", columns, rows, frozenset({"terminal", "md", "html", "latex"}),
                 results_caption(report), blocks, result_notes(report))


def result_notes(report) -> list[str]:
    """What the results table leaves out, and why."""
    recorded = {k for g in report.trained for run in g.runs for k in run.metrics}
    notes = []
    missing = [m.key for m in KEY_METRICS if m not in report.metrics and m.key not in recorded]
    if missing and report.request.metrics is None:
        notes.append(f"Not reported by these runs: {', '.join(missing)}.")
    if MINORITY in [m.key for m in report.metrics] and not all(MINORITY in g.stats for g in report.trained):
        notes.append("Minority recall is left out where the classes have equal sizes (imbalance ratio 1): "
                     "there it would name an arbitrary class.")
    return notes


def comparisons_table(report) -> Table:
    records = [c.record() for c in report.comparisons.items]
    return Table("comparisons", "Comparisons with the baseline", list(COLUMNS),
                 [list(r.values()) for r in records], frozenset({"csv", "html"}),
                 "One row per loss, context, metric and baseline on matched seeds (docs/statistics.md).")


def groups_table(report) -> Table:
    """report.csv: one row per group with its settings and, per test metric, mean, 95% interval, std, n."""
    keys = sorted({k for g in report.groups for k in g.settings})
    names = sorted({m for g in report.groups for m in g.stats if m.startswith("test/")})
    columns = (["context", "group", "baseline", *keys, "n"]
               + [f"{m}_{part}" for m in names for part in ("mean", "ci_low", "ci_high", "std", "n")])
    rows = []
    for g in report.groups:
        values = []
        for m in names:
            s = g.stats.get(m, NO_RUNS)
            values += [s.mean, s.low, s.high, s.std, s.n]
        rows.append([g.context, g.label, g.is_baseline, *(g.settings.get(k, "") for k in keys), len(g.runs),
                     *values])
    return Table("report", "Groups", columns, rows, frozenset({"csv"}))


def runs_table(report) -> Table:
    """runs.csv, tidy: one row per completed run × recorded metric, with the run's folder, every swept
    key, its seed, group and context as columns (`pandas.read_csv` then `seaborn` without reshaping)."""
    from xentlab.lab.report.compare import seed_of

    keys = sorted({k for g in report.groups for k in g.settings})
    rows = []
    for g in report.trained:
        for run in g.runs:
            where = [relative(run.path, report.sweep_dir), *(g.settings.get(k, "") for k in keys),
                     seed_of(run), g.label, g.context]
            rows += [[*where, name, value] for name, value in sorted(run.metrics.items())]
    columns = ["run", *keys, "seed", "group", "context", "metric", "value"]
    return Table("runs", "Runs", columns, rows, frozenset({"csv"}))


def convergence_table(report) -> Table | None:
    conv = report.convergence
    if conv is None:
        return None
    with_context = any(g.context for g, _, _ in conv.rows)
    columns = (["context"] if with_context else []) + ["group", "epochs to threshold", "epochs run"]
    rows = [([g.context] if with_context else []) + [g.label, s.text(1), n] for g, s, n in conv.rows]
    return Table("", "Convergence", columns, rows, frozenset({"md", "html"}), conv.header() + ".",
                 notes=conv.comparison_text())


def tuning_table(report) -> Table | None:
    """tuning.csv and the "Tuned settings" section: the setting each tuned group trained with, from its
    runs' `tune.result` (xentlab.lab.tuning), or None when no run was tuned. Jobs of one group that chose
    differently (a seed range split over jobs) show each choice."""
    rows = []
    for g in report.trained:
        tuned = [run.config["tune"] for run in g.runs if isinstance(run.config.get("tune"), dict)]
        results = [t["result"] for t in tuned if isinstance(t.get("result"), dict)]
        if not results:
            continue
        chosen = sorted({", ".join(str(o) for o in r.get("chosen") or []) for r in results})
        scores = sorted({r.get("score") for r in results if isinstance(r.get("score"), (int, float))})
        seeds = sorted({str(r.get("tuning_seeds")) for r in results})
        rows.append([g.context, g.label, "; ".join(chosen), str(results[0].get("objective")),
                     "; ".join(f"{s:.4f}" for s in scores), results[0].get("candidates"), "; ".join(seeds)])
    if not rows:
        return None
    return Table("tuning", "Tuned settings", ["context", "loss / run", "chosen", "objective",
                                              "tuning score", "candidates", "tuning seeds"], rows,
                 frozenset({"md", "html", "csv"}),
                 "Each loss trained and was tested with the setting its grid's candidates scored best on, by "
                 "the mean objective on the validation split over tuning seeds that are not the reported "
                 "seeds (tuning.json in each job folder has every candidate's scores).")


def problems_table(report) -> Table | None:
    if not report.problems:
        return None
    rows = [[relative(run.path, report.sweep_dir), run.status, run.error or ""] for run in report.problems]
    return Table("", "Failed, unreadable or incomplete jobs", ["job", "status", "reason"], rows)


def tables(report) -> list[Table]:
    """Every table of the report, in the order the documents show them; tables that other modules add to
    `report.tables` come after the results."""
    found = [results_table(report), tuning_table(report), *report.tables, convergence_table(report),
             comparisons_table(report),
             groups_table(report), runs_table(report), problems_table(report)]
    return [t for t in found if t is not None]
