"""``flaxlm train CONFIG [overrides]``: train a run, or resume it from its newest checkpoint."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train or resume a run")
    p.add_argument("config", help="YAML config, e.g. configs/gpt_demo.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    """Exit 0 when done, 75 (EX_TEMPFAIL) when preempted before the last step, so a scheduler
    reruns it and the rerun resumes."""
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

        line = summary_line(result.evals[-1], family_of(cfg)) + rates_text(result.rates)
        print(f"done: step {result.step}, {line}; run dir {result.run_dir}")
    return 0


def rates_text(rates: dict) -> str:
    """``, mean 3,591 tokens/s, MFU 52% (measured:cpu:float32)`` for the done line."""
    if "tokens_per_s" not in rates:
        return ""
    text = f", mean {rates['tokens_per_s']:,.0f} tokens/s"
    if "mfu" in rates:
        text += f", MFU {100 * rates['mfu']:.1f}% ({rates.get('peak_origin', 'peak unknown')})"
    return text
