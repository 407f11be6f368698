"""Train-step throughput and MFU of a config, against the matmul peak measured in the same run.

    python benchmarks/train_step.py configs/gpt_demo.yaml [section.key=value ...]

Uses random tokens (no data pipeline), so it measures the compiled step alone. Prints one JSON
line: step_s (median), tokens_per_s, peak_gflops (before/after), mfu, mfu_incl_head.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import numpy as np

from flaxlm.config import load_config
from flaxlm.models import build_model
from flaxlm.optim import make_optimizer
from flaxlm.perf import flops_per_token, measure_matmul_peak
from flaxlm.sharding import build_mesh
from flaxlm.train.batches import put_train_batch
from flaxlm.train.state import create_state
from flaxlm.train.step import jit_train_step, make_train_step, step_controls


def main(argv: list[str]) -> None:
    cfg = load_config(argv[0], ["data.paths=[]", *argv[1:]])
    seq_len, batch, accum = cfg.data.seq_len, cfg.train.batch_size, cfg.train.grad_accum
    mesh = build_mesh(cfg.mesh)
    model = build_model(cfg.model)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.d_model)
    state, state_sh = create_state(model, tx, mesh, seq_len, cfg.train.seed)
    step = jit_train_step(make_train_step(model, cfg, schedule), mesh, state_sh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    local = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "loss_mask": np.ones((batch, seq_len), np.float32),
    }
    device_batch = put_train_batch(local, mesh, accum)
    controls = step_controls()

    peak_before = measure_matmul_peak()
    t0 = time.perf_counter()
    state, metrics = step(state, device_batch, controls)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(3):  # warm-up
        state, metrics = step(state, device_batch, controls)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        state, metrics = step(state, device_batch, controls)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    peak_after = measure_matmul_peak()

    step_s = statistics.median(times)
    tokens_per_s = batch * seq_len / step_s
    peak = max(peak_before, peak_after)
    result = {
        "config": argv[0],
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "compile_s": compile_s,
        "peak_gflops": peak / 1e9,
        "peak_gflops_before": peak_before / 1e9,
        "peak_gflops_after": peak_after / 1e9,
        "mfu": flops_per_token(cfg.model, seq_len, include_head=False) * tokens_per_s / peak,
        "mfu_incl_head": flops_per_token(cfg.model, seq_len) * tokens_per_s / peak,
    }
    if abs(peak_before - peak_after) > 0.2 * peak:
        print(
            "warning: the matmul peak moved by >20% during the run (noisy machine)", file=sys.stderr
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
