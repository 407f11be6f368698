"""``flaxlm plan CONFIG [overrides]``: per-device memory of a config's train step, from an
ahead-of-time compile for this machine, simulated CPU devices or a named TPU topology."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="per-device memory of a config's train step (AOT compile)"
    )
    p.add_argument("config", help="YAML config, e.g. configs/gpt_7b.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument(
        "--devices", type=int, default=0, help="simulate this many CPU devices (0 = real ones)"
    )
    p.add_argument(
        "--target",
        default="",
        help="compile for this TPU topology, e.g. v5e:8x8 (libtpu), or these GPUs, "
        "MODEL:GPUS or MODEL:HOSTSxGPUS, e.g. h100:8, h100:2x8, a100:8, b200:8 (.[cuda12])",
    )
    p.add_argument("--slices", type=int, default=1, help="--target: slices of it (DCN)")
    p.add_argument(
        "--step-time", type=float, action="append", default=[], metavar="S",
        help="--target: the MFU a step of S seconds would mean (repeatable)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=plan_command)


def plan_command(args: argparse.Namespace) -> int:
    import jax

    import flaxlm.families  # noqa: F401  registers the families' config sections (objective)
    from flaxlm.config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides, check_paths=False)  # plans read no data
    if args.devices and args.target:
        raise ConfigError("plan: give --devices (simulated CPU devices) or --target, not both")
    if args.devices:
        # Before any backend starts: plan a pod's layout on this machine's CPU.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.devices)
    from flaxlm.tools.plan import format_plan, plan

    report = plan(cfg, args.target or None, args.slices)
    if args.target:  # what a step time would mean in MFU on the target's published peak
        from flaxlm.train.flops import plan_mfu_fields

        report.update(plan_mfu_fields(cfg, report, args.step_time))
    print(json.dumps(report) if args.json else format_plan(report))
    return 0
