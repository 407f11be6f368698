"""``flaxlm eval PATH``: loss / perplexity (and the family's own metrics) of a checkpoint."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="loss / perplexity of a run or checkpoint")
    p.add_argument("path", help="RUN_DIR or RUN_DIR/checkpoints/<step>")
    p.add_argument("--data", nargs="+", help="text/JSONL sources instead of the run's val split")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole split")
    p.add_argument("--batch-size", type=int, default=0, help="0 = the run's micro-batch")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="JSON report path (default RUN_DIR/evals/step_<N>.<split>.json)")
    p.set_defaults(func=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    from flaxlm.families import family_of, report_lines
    from flaxlm.tools.evaluate import evaluate, save_report
    from flaxlm.tools.load import load_checkpoint

    loaded = load_checkpoint(args.path)
    report = evaluate(
        loaded,
        args.data,
        args.split,
        args.max_batches,
        batch_size=args.batch_size,
        progress=not args.json,
    )
    path = save_report(report, args.path, args.out)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"checkpoint step      {report['step']}")
    print(f"tokens               {report['tokens']:,}")
    print(f"val_loss             {report['val_loss']:.4f} nats/token")
    for line in report_lines(report, family_of(loaded.cfg)):
        print(line)
    print(f"report               {path}")
    return 0
