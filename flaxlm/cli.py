"""``flaxlm <command>``: a thin layer that parses arguments and calls the library.

flaxlm data demo data/shakespeare             # write the demo corpus
flaxlm train configs/gpt_demo.yaml train.steps=600
flaxlm eval runs/gpt_demo --json
flaxlm eval runs/gpt_demo --tasks shakespeare_next_line shakespeare_cloze --num-fewshot 5
flaxlm lm-eval --model flaxlm --model_args run_dir=runs/gpt_demo --tasks shakespeare_cloze
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

from flaxlm.commands import (
    bench,
    config,
    convert,
    data,
    evaluate,
    finetune,
    generate,
    lm_eval,
    plan,
    report,
    sample,
    tokenizer,
    train,
)
from flaxlm.config import ConfigError
from flaxlm.runtime.host_memory import reexec_with_huge_pages
from flaxlm.storage import StorageError

# In the order ``flaxlm --help`` lists them. Each module adds its command's parser (with
# ``func`` = its handler) and imports the library only inside the handler, so
# ``flaxlm --help`` starts without jax.
COMMANDS = (train, evaluate, sample, generate, config, convert, finetune, report, plan, bench,
            tokenizer, data, lm_eval)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; known library errors become one line on stderr
    and exit 2 (3 when training diverged, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError, StorageError) as exc:
        if type(exc).__name__ == "TrainingDiverged":  # not imported here: it pulls in jax
            print(f"flaxlm {args.command}: training diverged: {exc}", file=sys.stderr)
            return 3
        # Library errors already name the bad value; print one line, not a traceback.
        print(f"flaxlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flaxlm {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The ``flaxlm`` parser: one subcommand per module of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="flaxlm", description="JAX/Flax LM pretraining")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def run() -> None:
    """The ``flaxlm`` command: first re-executes with huge pages for malloc when jax runs
    on the CPU (flaxlm/runtime/host_memory.py), then :func:`main`."""
    reexec_with_huge_pages()
    sys.exit(main())


if __name__ == "__main__":
    run()
