"""``flaxlm generate PATH (--prompt TEXT | --prompts FILE)``: KV-cache decoding with sampling
(temperature, top-k, top-p) or beam search, many prompts in batches."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text (KV cache; sampling or beam search)")
    p.add_argument("path", help="RUN_DIR or RUN_DIR/checkpoints/<step>")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to continue")
    src.add_argument("--prompts", help="a file with one prompt per line (generated in batches)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 = off")
    p.add_argument("--num-beams", type=int, default=1, help="> 1 = beam search")
    p.add_argument("--length-penalty", type=float, default=0.6, help="GNMT alpha (beams)")
    p.add_argument("--no-stop-at-eos", action="store_true", help="run to --max-new-tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.set_defaults(func=generate_command)


def generate_command(args: argparse.Namespace) -> int:
    from flaxlm.tools.generate import GenerateOptions, generate
    from flaxlm.tools.load import load_checkpoint

    opts = GenerateOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        stop_at_eos=not args.no_stop_at_eos,
        seed=args.seed,
    )
    prompts = _prompts(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
    loaded = load_checkpoint(args.path)
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        for prompt, text in zip(chunk, generate(loaded, chunk, opts), strict=True):
            if args.json:
                print(json.dumps({"prompt": prompt, "completion": text}))
            else:
                print(prompt + text + ("\n" if len(prompts) > 1 else ""))
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` as a list of one, or the non-empty lines of the ``--prompts`` file."""
    if not args.prompts:
        return [args.prompt]
    from flaxlm import storage

    lines = storage.read_text(args.prompts).splitlines()  # a file or a bucket's object
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {args.prompts!r} holds no non-empty line")
    return prompts
