"""``flaxlm finetune PATH --data FILE``: a classifier on a BERT run's [CLS] vector, or, on an
encoder-decoder (t5) run, seq2seq fine-tuning on (input, target) columns
(flaxlm/tools/seq2seq_finetune.py)."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="a classifier on a BERT run; seq2seq on (input, target) for a t5 run"
    )
    p.add_argument("path", help="a BERT or t5 RUN_DIR or RUN_DIR/checkpoints/<step>")
    p.add_argument("--data", required=True, help="labelled .csv (header row) or .jsonl")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--input-column", default="input", help="t5: the encoder text")
    p.add_argument("--target-column", default="target", help="t5: the decoder text")
    p.add_argument("--group-column", default="", help="rows sharing it stay in one split")
    p.add_argument("--val-data", default="", help="validation file (default: split --data)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument(
        "--target-len", type=int, default=0, help="t5: decoder row length; 0 = --max-len"
    )
    p.add_argument("--max-val-rows", type=int, default=0, help="t5: rows decoded; 0 = all")
    p.add_argument("--labels", default="", help="comma-separated classes (default: all seen)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="default 5e-5 (BERT), 5e-4 (t5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=0, help="0 = the run's data.seq_len")
    p.add_argument("--max-train-rows", type=int, default=0, help="0 = all")
    p.add_argument("--freeze-body", action="store_true", help="train only the head")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="output folder (default RUN_DIR/finetune)")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.set_defaults(func=finetune_command)


def finetune_command(args: argparse.Namespace) -> int:
    from flaxlm import storage
    from flaxlm.families import family_of
    from flaxlm.tools.finetune import FinetuneOptions, finetune
    from flaxlm.tools.load import load_checkpoint, resolve_checkpoint

    loaded = load_checkpoint(args.path)
    args.out = args.out or storage.join(str(resolve_checkpoint(args.path)[0]), "finetune")
    if family_of(loaded.cfg).encoder_decoder:
        return _seq2seq_command(args, loaded)
    opts = FinetuneOptions(
        text_column=args.text_column,
        label_column=args.label_column,
        group_column=args.group_column,
        val_data=args.val_data,
        val_fraction=args.val_fraction,
        labels=tuple(x.strip() for x in args.labels.split(",") if x.strip()),
        epochs=args.epochs,
        lr=5e-5 if args.lr is None else args.lr,
        batch_size=args.batch_size,
        max_len=args.max_len,
        max_train_rows=args.max_train_rows,
        freeze_body=args.freeze_body,
        dropout=args.dropout,
        seed=args.seed,
        out=args.out,
    )
    report = finetune(loaded, args.data, opts)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "history"}))
        return 0
    print(f"accuracy             {100 * report['accuracy']:.1f}%")
    print(f"macro-F1             {100 * report['macro_f1']:.1f}%")
    print(f"majority baseline    {100 * report['majority_baseline']:.1f}%")
    print(f"checkpoint           {report['checkpoint']}")
    return 0


def _seq2seq_command(args: argparse.Namespace, loaded) -> int:
    from flaxlm.tools.seq2seq_finetune import Seq2SeqOptions, finetune_seq2seq

    opts = Seq2SeqOptions(
        input_column=args.input_column, target_column=args.target_column,
        group_column=args.group_column, val_data=args.val_data,
        val_fraction=args.val_fraction, epochs=args.epochs,
        lr=5e-4 if args.lr is None else args.lr, batch_size=args.batch_size,
        max_len=args.max_len, target_len=args.target_len, max_train_rows=args.max_train_rows,
        max_val_rows=args.max_val_rows, dropout=args.dropout, seed=args.seed, out=args.out,
    )  # fmt: skip
    report = finetune_seq2seq(loaded, args.data, opts)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "history"}))
        return 0
    print(f"exact match          {100 * report['exact_match']:.1f}%")
    print(f"copy baseline        {100 * report['copy_baseline']:.1f}%")
    print(f"majority baseline    {100 * report['majority_baseline']:.1f}%")
    print(f"checkpoint           {report['checkpoint']}")
    return 0
