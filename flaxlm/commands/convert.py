"""``flaxlm convert to-hf|from-hf``: HuggingFace transformers interop (GPT, Llama, BERT)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="HuggingFace transformers interop (GPT, Llama, BERT)")
    sub = p.add_subparsers(dest="convert_command", required=True)
    c = sub.add_parser("to-hf", help="checkpoint -> GPT2LMHeadModel / BertForPreTraining directory")
    c.add_argument("path", help="RUN_DIR or RUN_DIR/checkpoints/<step>")
    c.add_argument("out", help="output directory (a folder or a bucket URL)")
    c.set_defaults(func=convert_to_hf_command)
    c = sub.add_parser("from-hf", help="HF GPT-2 / BERT directory -> run dir with checkpoint 0")
    c.add_argument("hf_dir", help="a directory with config.json + model.safetensors")
    c.add_argument("out", help="the run directory to create (a folder or a bucket URL)")
    c.add_argument(
        "--tokenizer",
        help="a .model, tokenizer.json or HF tokenizer dir (default: HF_DIR's own tokenizer)",
    )
    c.add_argument(
        "--seq-len", type=int, default=0, help="data.seq_len (default min(positions, 1024))"
    )
    c.set_defaults(func=convert_from_hf_command)


def convert_to_hf_command(args: argparse.Namespace) -> int:
    from flaxlm import storage
    from flaxlm.tools.convert import to_hf

    if storage.is_posix(args.out):
        print(f"wrote {to_hf(args.path, args.out)}")
        return 0
    # A bucket: written here first, then copied up with config.json last (HF loaders need
    # it, so a half-copied directory does not load).
    local = to_hf(args.path, storage.local_cache(args.out))
    storage.publish(local, args.out, "config.json")
    print(f"wrote {args.out}")
    return 0


def convert_from_hf_command(args: argparse.Namespace) -> int:
    from flaxlm.tools.convert import from_hf

    print(f"wrote {from_hf(args.hf_dir, args.out, args.tokenizer, args.seq_len)}")
    return 0
