"""Generation speed: KV cache against re-running the whole window for every token.

    python benchmarks/generate.py [CONFIG] [section.key=value ...]

A thin wrapper over ``flaxlm bench CONFIG --what decode --json`` (flaxlm/tools/bench_phases.py):
a random-weight GPT of the config's shape (default configs/bench/gpt_small_cpu.yaml) decodes
greedily from a prompt of half the context to the full ``data.seq_len``, once with the cache
and once re-running the window; compile time is excluded and the tokens must agree.
"""

from __future__ import annotations

import sys

from flaxlm.cli import main

if __name__ == "__main__":
    args = sys.argv[1:] or ["configs/bench/gpt_small_cpu.yaml"]
    sys.exit(main(["bench", *args, "--what", "decode", "--json"]))
