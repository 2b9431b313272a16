"""`xentlab` command: `xentlab losses` lists the registered losses."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table


def list_losses_command(args: argparse.Namespace) -> int:
    from xentlab.losses import registry

    table = Table(title="xentlab losses")
    for column in ("name", "tasks"):
        table.add_column(column)
    for name in sorted(registry._REGISTRY):
        entry = registry.get_loss(name)
        table.add_row(name, ", ".join(entry.tasks))
    Console().print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xentlab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("losses", help="list the registered losses").set_defaults(run=list_losses_command)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
