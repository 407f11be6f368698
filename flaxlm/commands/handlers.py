"""What each ``flaxlm`` command does: parse-free handlers that load a config or a checkpoint
and call the library (flaxlm/cli.py builds the parser and maps each command here). Library
imports stay inside the handlers so ``flaxlm --help`` starts without jax."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def train_command(args: argparse.Namespace) -> int:
    from flaxlm.config import load_config
    from flaxlm.runtime.distributed import initialize
    from flaxlm.train import train
    from flaxlm.train.watchdog import EXIT_CODE

    cfg = load_config(args.config, args.overrides)
    initialize(cfg.train.distributed)  # before anything touches a JAX backend
    result = train(cfg)
    if result.preempted:
        # Saved after a SIGTERM/SIGINT (the loop said where): 75, EX_TEMPFAIL like the hang
        # watchdog, tells a scheduler to run it again, and the rerun resumes. Every process
        # stopped at the same step, so every process exits with the same code.
        return EXIT_CODE if result.step < cfg.train.steps else 0
    if result.process_index != 0:
        return 0
    if result.rollbacks:
        ledger = result.run_dir / "skip_ledger.json"
        print(f"{len(result.rollbacks)} rollback(s); skipped data windows in {ledger}")
    if result.evals:
        from flaxlm.families import family_of, summary_line

        line = summary_line(result.evals[-1], family_of(cfg))
        print(f"done: step {result.step}, {line}; run dir {result.run_dir}")
    return 0


def config_show_command(args: argparse.Namespace) -> int:
    """``flaxlm config show CONFIG [overrides]``: the config as training would use it, YAML
    (or ``--json``), with every default written out. Reads no data."""
    import yaml

    from flaxlm.config import load_config, to_dict

    resolved = to_dict(load_config(args.config, args.overrides, check_paths=False))
    if args.json:
        print(json.dumps(resolved))
    else:
        print(yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from flaxlm.families import family_of, report_lines
    from flaxlm.tools.evaluate import evaluate, save_report
    from flaxlm.tools.load import load_checkpoint

    loaded = load_checkpoint(args.path)
    report = evaluate(
        loaded,
        args.data,
        args.split,
        args.max_batches,
        batch_size=args.batch_size,
        progress=not args.json,
    )
    path = save_report(report, args.path, args.out)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"checkpoint step      {report['step']}")
    print(f"tokens               {report['tokens']:,}")
    print(f"val_loss             {report['val_loss']:.4f} nats/token")
    for line in report_lines(report, family_of(loaded.cfg)):
        print(line)
    print(f"report               {path}")
    return 0


def sample_command(args: argparse.Namespace) -> int:
    """``flaxlm sample``: ``flaxlm generate`` with one prompt and sampling options only."""
    from flaxlm.tools.generate import GenerateOptions, generate
    from flaxlm.tools.load import load_checkpoint

    loaded = load_checkpoint(args.path)
    opts = GenerateOptions(args.max_new_tokens, args.temperature, seed=args.seed)
    print(args.prompt + generate(loaded, args.prompt, opts))
    return 0


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
    if args.prompts:
        lines = Path(args.prompts).read_text().splitlines()
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts {args.prompts!r} holds no non-empty line")
    else:
        prompts = [args.prompt]
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


def convert_to_hf_command(args: argparse.Namespace) -> int:
    from flaxlm.tools.convert import to_hf

    print(f"wrote {to_hf(args.path, args.out)}")
    return 0


def convert_from_hf_command(args: argparse.Namespace) -> int:
    from flaxlm.tools.convert import from_hf

    print(f"wrote {from_hf(args.hf_dir, args.out, args.tokenizer, args.seq_len)}")
    return 0


def finetune_command(args: argparse.Namespace) -> int:
    from flaxlm.tools.finetune import FinetuneOptions, finetune

    opts = FinetuneOptions(
        text_column=args.text_column,
        label_column=args.label_column,
        group_column=args.group_column,
        val_data=args.val_data,
        val_fraction=args.val_fraction,
        labels=tuple(x.strip() for x in args.labels.split(",") if x.strip()),
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_len=args.max_len,
        max_train_rows=args.max_train_rows,
        freeze_body=args.freeze_body,
        seed=args.seed,
        out=args.out,
    )
    report = finetune(args.path, args.data, opts)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "history"}))
        return 0
    print(f"accuracy             {100 * report['accuracy']:.1f}%")
    print(f"macro-F1             {100 * report['macro_f1']:.1f}%")
    print(f"majority baseline    {100 * report['majority_baseline']:.1f}%")
    print(f"checkpoint           {report['checkpoint']}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from flaxlm.tools.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")
    return 0


def plan_command(args: argparse.Namespace) -> int:
    import jax

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
    print(json.dumps(report) if args.json else format_plan(report))
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from flaxlm.config import load_config
    from flaxlm.tools.bench import format_report, run_bench

    cfg = load_config(args.config, args.overrides, check_paths=False)  # random tokens
    report = run_bench(cfg, args.what, args.steps, args.warmup, args.decode_batch)
    if report.get("warning"):
        print(f"flaxlm bench: warning: {report['warning']}", file=sys.stderr)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


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


def data_demo_command(args: argparse.Namespace) -> int:
    from flaxlm.data.demo import write_shakespeare

    files = write_shakespeare(Path(args.out))
    print(f"wrote {len(files)} plays to {args.out}")
    return 0


def data_rotten_tomatoes_command(args: argparse.Namespace) -> int:
    from flaxlm.data.labelled import write_rotten_tomatoes

    print(f"wrote {write_rotten_tomatoes(args.out)}")
    return 0


def data_inspect_command(args: argparse.Namespace) -> int:
    from flaxlm.config import load_config
    from flaxlm.data.inspection import format_report, inspect_data
    from flaxlm.families import family_of

    cfg = load_config(args.config, args.overrides)
    sample = family_of(cfg).inspect_sample
    report = inspect_data(cfg, sample, args.step, args.rows, progress=not args.json)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def data_prepare_command(args: argparse.Namespace) -> int:
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


def data_verify_command(args: argparse.Namespace) -> int:
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


def data_build_tfds_command(args: argparse.Namespace) -> int:
    from flaxlm.data.tfds_build import build_tfds

    out = build_tfds(
        args.paths, args.name, args.data_dir, args.field, args.version, args.split,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote {out}; read it with data.paths=[tfds:{args.name}] data.tfds_data_dir=...")
    return 0
