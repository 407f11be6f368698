"""``flaxlm config show CONFIG [overrides]``: the config as training would use it."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("config", help="config tools")
    sub = p.add_subparsers(dest="config_command", required=True)
    c = sub.add_parser("show", help="the resolved config: every key, defaults included")
    c.add_argument("config", help="YAML config, e.g. configs/gpt_demo.yaml")
    c.add_argument("overrides", nargs="*", help="section.key=value overrides")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=config_show_command)


def config_show_command(args: argparse.Namespace) -> int:
    """``flaxlm config show CONFIG [overrides]``: the config as training would use it, YAML
    (or ``--json``), with every default written out. Reads no data."""
    import yaml

    import flaxlm.families  # noqa: F401  registers the families' config sections (objective)
    from flaxlm.config import load_config, to_dict

    resolved = to_dict(load_config(args.config, args.overrides, check_paths=False))
    if args.json:
        print(json.dumps(resolved))
    else:
        print(yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0
