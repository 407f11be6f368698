"""``flaxlm tokenizer train PATHS --out PREFIX``: a sentencepiece model with flaxlm's special
tokens."""

from __future__ import annotations

import argparse
from pathlib import Path

from flaxlm.config import CHOICES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="tokenizer tools")
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="train a sentencepiece model with flaxlm's special tokens")
    t.add_argument("paths", nargs="+", help="text files or directories")
    t.add_argument("--out", required=True, help="model prefix; writes OUT.model and OUT.vocab")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--type", default="bpe", choices=CHOICES["data.tokenizer_type"])
    t.add_argument("--no-byte-fallback", action="store_true")
    t.add_argument(
        "--character-coverage", type=float, default=1.0, help="1.0 = every character (CJK)"
    )
    t.add_argument(
        "--normalization",
        default="identity",
        choices=CHOICES["data.tokenizer_normalization"],
        help="identity = exact round trip; the others are lossy",
    )
    t.add_argument("--field", default="text", help="text field of .jsonl/.parquet/dataset rows")
    t.set_defaults(func=tokenizer_train_command)


def tokenizer_train_command(args: argparse.Namespace) -> int:
    from flaxlm.data import iter_documents, train_tokenizer_on_documents

    path = train_tokenizer_on_documents(
        iter_documents(args.paths, args.field),
        Path(args.out),
        args.vocab_size,
        model_type=args.type,
        byte_fallback=not args.no_byte_fallback,
        character_coverage=args.character_coverage,
        normalization=args.normalization,
    )
    print(f"wrote {path}")
    return 0
