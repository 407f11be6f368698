"""``flaxlm bench CONFIG [overrides]``: train-step (and data, decode, checkpoint) speed, with
MFU against the peak training uses (published on TPU/GPU, cached probe on CPU), named in the
report, and matmul probes before and after the timed steps."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="train-step speed and MFU (peak and its origin named)")
    p.add_argument("config", help="YAML config, e.g. configs/bench/gpt_small_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--steps", type=int, default=10, help="timed train steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="steps run after compile, not timed")
    p.add_argument(
        "--what", default="train", choices=("train", "data", "decode", "checkpoint", "all")
    )
    p.add_argument("--decode-batch", type=int, default=1, help="rows decoded at once")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="a jax.profiler trace of the timed steps into DIR (*.xplane.pb: TensorBoard, XProf)",
    )
    p.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    from flaxlm.config import load_config
    from flaxlm.tools.bench import format_report, run_bench

    cfg = load_config(args.config, args.overrides, check_paths=False)  # random tokens
    report = run_bench(cfg, args.what, args.steps, args.warmup, args.decode_batch, args.profile)
    if report.get("warning"):
        print(f"flaxlm bench: warning: {report['warning']}", file=sys.stderr)
    print(json.dumps(report) if args.json else format_report(report))
    return 0
