"""Generation speed: KV cache against re-running the window for every token.

    python benchmarks/generate.py [--batch 1 8] [--new 96] [--prompt 32]

The model is `configs/gpt_demo.yaml`'s (d 256, 4 layers, vocab 4096, context 128) with random
weights; greedy, no early stop, so both paths produce the same tokens (checked). Compile time
is excluded: each path runs once before it is timed.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxlm.config import load_config
from flaxlm.models import GPT
from flaxlm.tools.generate import GenerateOptions, generate_ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new", type=int, default=96)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config("configs/gpt_demo.yaml").model
    model = GPT(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    opts = GenerateOptions(max_new_tokens=args.new, stop_at_eos=False)
    rng = np.random.default_rng(0)
    print(
        f"{jax.devices()[0].device_kind}; d_model {cfg.d_model}, {cfg.n_layers} layers, "
        f"context {cfg.max_seq_len}, prompt {args.prompt}, {args.new} new tokens"
    )
    for batch in args.batch:
        prompts = rng.integers(7, cfg.vocab_size, (batch, args.prompt)).tolist()
        times, outputs = {}, {}
        for use_cache in (True, False):
            run = functools.partial(
                generate_ids, model, params, prompts, opts, None, use_cache=use_cache
            )
            outputs[use_cache] = run().ids  # compile
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
            times[use_cache] = best
        same = outputs[True] == outputs[False]
        tokens = batch * args.new
        print(
            f"batch {batch}: KV cache {tokens / times[True]:,.0f} tokens/s, recompute "
            f"{tokens / times[False]:,.0f} tokens/s, speed-up {times[False] / times[True]:.1f}x, "
            f"same tokens: {same}"
        )


if __name__ == "__main__":
    main()
