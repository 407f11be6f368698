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
    p.add_argument(
        "--remat", default="", metavar="POLICY,POLICY",
        help="plan once per model.remat policy (e.g. full,save_qkv_proj), one row each",
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

    if args.remat:
        return _compare_remat(args, plan)
    report = plan(cfg, args.target or None, args.slices)
    if args.target:  # what a step time would mean in MFU on the target's published peak
        from flaxlm.train.flops import plan_mfu_fields

        report.update(plan_mfu_fields(cfg, report, args.step_time))
    print(json.dumps(report) if args.json else format_plan(report))
    return 0


def _compare_remat(args: argparse.Namespace, plan) -> int:
    """``--remat a,b``: the same plan once per ``model.remat`` policy; a row each (or one
    JSON object keyed by policy), so the memory each policy buys is read side by side."""
    from flaxlm.config import load_config

    reports = {}
    for policy in [p.strip() for p in args.remat.split(",") if p.strip()]:
        overrides = [*args.overrides, f"model.remat={policy}"]
        cfg = load_config(args.config, overrides, check_paths=False)
        reports[policy] = plan(cfg, args.target or None, args.slices)
    if args.json:
        print(json.dumps(reports))
        return 0

    def gib(n) -> str:
        return "unknown" if n is None else f"{n / 2**30:.3f}"

    print(f"{'remat':<18}{'temporaries GiB':>16}{'host GiB':>10}{'total GiB':>11}  fits")
    for policy, r in reports.items():
        host = r.get("host_temp_bytes", 0)
        print(f"{policy:<18}{gib(r['activations_bytes']):>16}{gib(host):>10}"
              f"{gib(r['bytes_per_device']):>11}  {r.get('fits', '-')}")  # fmt: skip
    return 0
