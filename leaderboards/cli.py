"""`python -m distillbench.leaderboards build --results DIR --out DIR [--protocol P] [--wandb]`.

Writes `<out>/<protocol>.{md,tex,csv,html,png}` for every protocol with records (or those named),
prints a summary and every excluded record with its reason. Exit status 0 when the tables were
written (excluded records are listed, not fatal), 2 on a usage or input error.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from rich.console import Console
from rich.table import Table

from ..benchmark.errors import USER_ERRORS
from .build import build
from .render import top1_text

console = Console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distillbench.leaderboards", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="generate the leaderboard tables from run records")
    b.add_argument("--results", default="results", help="folder of run records (default: results)")
    b.add_argument("--out", default="leaderboards", help="where the tables go (default: leaderboards)")
    b.add_argument("--protocol", action="append", default=None, help="only this protocol (repeatable)")
    b.add_argument("--reported", default=None, help="paper-reported numbers (default: leaderboards/reported.yaml)")
    b.add_argument("--no-png", action="store_true", help="skip the plot")
    b.add_argument("--wandb", action="store_true", help="also log each table to W&B as a wandb.Table artifact")
    b.add_argument("--wandb-dir", default=".", help="where the W&B run folder goes (default: ./wandb)")
    return parser


def _command(args: argparse.Namespace) -> str:
    parts = ["python -m distillbench.leaderboards build", f"--results {shlex.quote(args.results)}"]
    parts.append(f"--out {shlex.quote(args.out)}")
    parts += [f"--protocol {shlex.quote(p)}" for p in args.protocol or []]
    return " ".join(parts)


def cmd_build(args: argparse.Namespace) -> int:
    boards = build(
        args.results,
        args.out,
        protocols=args.protocol,
        reported=args.reported,
        command=_command(args),
        png=not args.no_png,
    )
    table = Table(title=f"leaderboards → {args.out}")
    for col in ("protocol", "hash", "teacher", "student", "#", "method", "n", "top-1"):
        table.add_column(col)
    for name, board in boards.items():
        for row in board.rows:
            table.add_row(
                name, row.protocol_hash, row.teacher, row.student, str(row.rank), row.method, str(row.n), top1_text(row)
            )
    Console().print(table)
    for board in boards.values():
        for item in board.excluded:
            console.print(f"[yellow]excluded[/] {item.path}: {'; '.join(item.reasons)}", highlight=False)
    if args.wandb:
        from .wandb_tables import push_tables

        console.print(push_tables(boards, args.wandb_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"build": cmd_build}[args.command](args)
    except USER_ERRORS as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
