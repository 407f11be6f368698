"""Train-step throughput and MFU of a config, against the matmul peak measured in the same run.

    python benchmarks/train_step.py configs/bench/gpt_small_cpu.yaml [section.key=value ...]

A thin wrapper over ``flaxlm bench CONFIG --json`` (flaxlm/tools/bench.py): random tokens, no
data files; prints one JSON line (step_s, tokens_per_s, peak_gflops, mfu, mfu_incl_head, ...).
"""

from __future__ import annotations

import sys

from flaxlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:], "--json"]))
