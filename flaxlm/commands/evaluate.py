"""``flaxlm eval PATH``: loss / perplexity (and the family's own metrics) of a checkpoint;
with ``--tasks``, benchmark tasks (lm-evaluation-harness YAML, flaxlm/tasks) instead."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="loss / perplexity, or benchmark tasks, of a run")
    p.add_argument("path", help="RUN_DIR or RUN_DIR/checkpoints/<step>")
    p.add_argument("--data", nargs="+", help="text/JSONL sources instead of the run's val split")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole split")
    p.add_argument("--batch-size", type=int, default=0, help="0 = the run's micro-batch")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="JSON report path (default RUN_DIR/evals/step_<N>.<split>.json)")
    tasks = p.add_argument_group("benchmark tasks (docs/tasks.md)")
    tasks.add_argument(
        "--tasks", nargs="+", metavar="NAME_OR_YAML", help="shipped task names or task YAML files"
    )
    tasks.add_argument(
        "--include-path", action="append", metavar="DIR", help="a folder of your task YAML files"
    )
    tasks.add_argument("--num-fewshot", type=int, help="examples per prompt (default: the task's)")
    tasks.add_argument("--limit", type=int, help="evaluate only the first N documents per task")
    p.set_defaults(func=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    if args.tasks:
        return tasks_command(args)
    if args.include_path or args.num_fewshot is not None or args.limit is not None:
        raise ValueError("--include-path, --num-fewshot and --limit go with --tasks")
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


def tasks_command(args: argparse.Namespace) -> int:
    """``--tasks``: the tasks load (one-line errors) before the checkpoint does."""
    from flaxlm.tasks import TaskSuite, format_table
    from flaxlm.tools.evaluate import save_report
    from flaxlm.tools.load import load_checkpoint
    from flaxlm.tools.task_eval import evaluate_tasks, tasks_report_path

    if args.data or args.max_batches:
        raise ValueError("--data and --max-batches do not apply to --tasks")
    suite = TaskSuite.load(args.tasks, args.include_path, args.num_fewshot, args.limit)
    loaded = load_checkpoint(args.path)
    report = evaluate_tasks(loaded, suite, args.batch_size)
    path = save_report(report, args.path, args.out or tasks_report_path(report, args.path))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"checkpoint step      {report['step']}")
    for line in format_table(report):
        print(line)
    print(f"report               {path}")
    return 0
