"""`xentlab` command: `xentlab losses` lists the registered losses (built-ins and plugins)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def losses_command(args: argparse.Namespace) -> int:
    """The loss table (name, tasks, parameters with defaults, source), then any plugin that failed to load."""
    from xentlab.losses import broken_plugins, list_losses

    console = Console()
    table = Table(title="xentlab losses", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("tasks")
    table.add_column("parameters (defaults)", overflow="fold")
    table.add_column("source", no_wrap=True)
    for entry in list_losses():
        params = escape(", ".join(f"{key}={value}" for key, value in entry.parameters().items()))
        if entry.hooks:
            params += f" [dim](+ {', '.join(entry.hooks)})[/dim]"
        table.add_row(escape(entry.name), ", ".join(entry.tasks), params, escape(entry.source))
    console.print(table)
    broken = broken_plugins()
    if broken:
        failed = Table(title="plugins that failed to load (skipped)", title_justify="left", style="red")
        for column in ("entry point", "distribution", "error"):
            failed.add_column(column, overflow="fold")
        for plugin in broken:
            failed.add_row(*map(escape, (plugin.entry_point, plugin.distribution, plugin.error)))
        console.print(failed)
    console.print("Train with one: `xentlab-train loss=<name> loss.<parameter>=<value>`; with any importable "
                  "class: `loss=custom loss._target_=pkg.module.Class`.")
    return 0


def report_command(args: argparse.Namespace) -> int:
    """Compare a sweep's runs: print the table and verdicts, write the requested files into --out.

    Exit status: 0 for a complete sweep; 1 when any job failed, is unreadable, unfinished or never started
    (0 with --allow-partial) or when the files could not be written; 2 for a folder with no runs, a run
    recorded twice, a report of other options in the way, or a bad argument.
    """
    from xentlab.lab.report import ReportWriteError, Request, write_report
    from xentlab.lab.report.render import one_line  # paths from the folder may hold newlines or escapes

    errors = Console(stderr=True)
    try:
        request = Request.parse(args.metrics, args.format, args.dedupe)
        report = write_report(args.sweep_dir, baseline=args.baseline, request=request, out=args.out,
                              overwrite=args.overwrite)
    except (ReportWriteError, ValueError) as error:
        # Not wrapped at the terminal width: the message holds a path to copy.
        errors.print(f"[red]xentlab report:[/] {escape(one_line(str(error)))}", soft_wrap=True)
        return 1 if isinstance(error, ReportWriteError) else 2
    if not report.complete and not args.allow_partial:
        errors.print("[red]xentlab report:[/] the sweep is incomplete (failed, unreadable, unfinished or "
                     "never-started jobs above); exit status 1 (--allow-partial: 0)", soft_wrap=True)
        return 1
    return 0


def add_report_arguments(report: argparse.ArgumentParser) -> None:
    report.add_argument("sweep_dir", help="a sweep folder (outputs/multirun/<date>/<time>), a run folder, or "
                                          "a parent folder of several sweeps")
    report.add_argument("--baseline", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                        help="the group every other is compared with (default: the sweep's report.baseline, "
                             "else loss=ce); loss=ce+posthoc_la or loss=ce+ts: CE after post-hoc logit "
                             "adjustment or temperature scaling")
    report.add_argument("--metrics", "--metric", action="append", metavar="NAME[,NAME]",
                        help="test metrics to compare, e.g. test/balanced_accuracy,test/la_balanced_accuracy "
                             "(any logged test/ metric; default: the key metrics the runs recorded)")
    report.add_argument("--format", action="append", metavar="md,csv,latex,html",
                        help="documents to write: md (report.md and PNG plots), latex (report.tex, "
                             "booktabs), html (report.html, one self-contained page); default md. The CSVs "
                             "(comparisons.csv, report.csv, runs.csv) are always written")
    report.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the files (default: the sweep folder); a report made there with "
                             "other options is not replaced without --overwrite")
    report.add_argument("--overwrite", action="store_true",
                        help="replace a report in --out made with other options")
    report.add_argument("--dedupe", choices=("first", "last"), default=None,
                        help="keep one copy of a run recorded twice (same configuration and seed, e.g. a "
                             "copied job folder), the first or last in path order; without it, an error")
    report.add_argument("--allow-partial", action="store_true",
                        help="exit 0 even when jobs failed, are unfinished or never started")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xentlab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("losses", help="list the registered losses").set_defaults(run=losses_command)
    report = commands.add_parser("report", help="compare the runs of a sweep folder (report.md, CSVs, LaTeX, "
                                                "HTML, plots)")
    add_report_arguments(report)
    report.set_defaults(run=report_command)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
