"""The whole benchmark suite: both bench configs, every part, one JSON line each.

    python benchmarks/run_all.py [--steps 10] [--repeats 1] [--out benchmarks/last_run.jsonl]

Runs ``flaxlm bench CONFIG --what all`` for configs/bench/gpt_small_cpu.yaml and
bert_small_cpu.yaml (each in its own process, so one's compile caches and memory do not
colour the other), prints a one-line summary per run, and appends the full reports to --out.
Copy the figures into benchmarks/RESULTS.md with the date and machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("configs/bench/gpt_small_cpu.yaml", "configs/bench/bert_small_cpu.yaml")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="runs per config")
    parser.add_argument("--decode-batch", type=int, default=8, help="rows decoded at once")
    parser.add_argument("--out", default=str(REPO / "benchmarks/last_run.jsonl"))
    args = parser.parse_args()
    with open(args.out, "a") as out:
        for config in CONFIGS:
            for _ in range(args.repeats):
                cmd = [sys.executable, "-m", "flaxlm.cli", "bench", config, "--what", "all",
                       "--steps", str(args.steps), "--decode-batch", str(args.decode_batch),
                       "--json"]  # fmt: skip
                done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
                if done.returncode:
                    print(done.stderr, file=sys.stderr)
                    return done.returncode
                report = json.loads(done.stdout.strip().splitlines()[-1])
                out.write(json.dumps({"config": config, **report}) + "\n")
                print(_summary(config, report))
    return 0


def _summary(config: str, r: dict) -> str:
    parts = [
        f"{Path(config).stem}: peak {r['peak_gflops']:.0f} GFLOP/s",
        f"step {1e3 * r['step_s']:.0f} ms",
        f"{r['tokens_per_s']:,.0f} tok/s",
        f"MFU {100 * r['mfu']:.1f} % (incl. head {100 * r['mfu_incl_head']:.1f} %)",
        f"data {r['data']['ratio_to_step']:.0f}x",
        f"checkpoint/50 {100 * r['checkpoint']['overhead']:.1f} %",
    ]
    if "speedup" in r["decode"]:
        parts.append(f"KV decode {r['decode']['speedup']:.1f}x")
    if r.get("warning"):
        parts.append(f"WARNING {r['warning']}")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
