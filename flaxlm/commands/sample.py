"""``flaxlm sample PATH --prompt TEXT``: ``flaxlm generate`` with one prompt and sampling
options only, printed with the prompt in front."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample", help="generate text from a run or checkpoint")
    p.add_argument("path", help="RUN_DIR or RUN_DIR/checkpoints/<step>")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=sample_command)


def sample_command(args: argparse.Namespace) -> int:
    from flaxlm.tools.generate import GenerateOptions, generate
    from flaxlm.tools.load import load_checkpoint

    loaded = load_checkpoint(args.path)
    opts = GenerateOptions(args.max_new_tokens, args.temperature, seed=args.seed)
    print(args.prompt + generate(loaded, args.prompt, opts))
    return 0
