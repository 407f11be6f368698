"""``flaxlm report RUN_DIR``: plots and a Markdown summary of a run's metrics."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="plots and a Markdown summary of a run's metrics")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (default RUN_DIR/report)")
    p.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    from flaxlm.tools.report import write_report
    from flaxlm.tools.report_goodput import goodput_table

    print(f"wrote {write_report(args.run_dir, args.out)}")
    print("\n".join(goodput_table(args.run_dir)), end="")  # the goodput table, if any
    return 0
