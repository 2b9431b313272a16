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
    """Compare a sweep's runs: print the table and verdicts, write report.md, report.csv and plots into it."""
    from xentlab.report import write_report

    try:
        write_report(args.sweep_dir)
    except ValueError as error:
        # Not wrapped at the terminal width: the message holds a path to copy.
        Console(stderr=True).print(f"[red]xentlab report:[/] {escape(str(error))}", soft_wrap=True)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xentlab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("losses", help="list the registered losses").set_defaults(run=losses_command)
    report = commands.add_parser("report", help="compare the runs of a sweep folder (report.md, .csv, plots)")
    report.add_argument("sweep_dir", help="a sweep folder, e.g. outputs/multirun/<date>/<time>")
    report.set_defaults(run=report_command)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
