"""Generation from an encoder–decoder (``model.family: t5``): the prompt is the encoder input.

    loaded = load_checkpoint("runs/t5_demo")
    generate(loaded, "to be or not to be", GenerateOptions(max_new_tokens=20))  # tools/generate

:func:`flaxlm.tools.generate.generate_for` hands an encoder–decoder family
(``Family.encoder_decoder``) to :func:`generate_seq2seq_ids`. How it runs, all in one jitted
function per (batch, padded prompt length, options):

1. Each prompt gets ``</s>`` appended (as the encoder saw its inputs in training), at most
   ``context`` tokens (the run's ``data.seq_len``: a longer prompt keeps its first tokens),
   right-padded to a multiple of ``PROMPT_BUCKET`` with encoder segment 0.
2. The encoder runs once; each decoder block's cross-attention keys and values are computed
   once from its output (``flaxlm.models.t5_decode.init_cache``); beam search repeats those
   cached arrays per beam instead of recomputing them.
3. The decoder starts from the decoder start token (the pad id, as T5) and feeds one token per
   row per step through its self-attention KV cache, inside the same sampling loop
   (:func:`flaxlm.tools.sampling.sample_loop`) and beam search
   (:func:`flaxlm.tools.beam.beam_search`) the decoder-only families use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxlm.models import t5_decode
from flaxlm.tools import beam, sampling

PROMPT_BUCKET = 32


def encoder_inputs(
    prompts: list[list[int]], eos_id: int, pad_id: int, context: int, bucket: int = PROMPT_BUCKET
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, segment ids) ``(B, P)``: each prompt's first ``context - 1`` tokens and ``</s>``,
    right-padded with ``pad_id`` (segment 0) to a multiple of ``bucket`` (at most ``context``
    rounded up)."""
    rows = [list(p)[: context - 1] + [eos_id] for p in prompts]
    width = -(-max(len(r) for r in rows) // bucket) * bucket
    ids = np.full((len(rows), width), pad_id, np.int32)
    segments = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        segments[i, : len(row)] = 1
    return ids, segments


def _start(model: nn.Module, params: Any, ids_BxS, segments_BxS, n: int, start_id: int):
    """Encoder once, cross K/V once, the start token fed: (logits ``BxV``, cache)."""
    encoded_BxSxD = t5_decode.encode(model, params, ids_BxS, segments_BxS)
    cache = t5_decode.init_cache(model, params, encoded_BxSxD, segments_BxS, n + 1)
    start_B = jnp.full((ids_BxS.shape[0],), start_id, jnp.int32)
    return t5_decode.decode_step(model, params, cache, start_B)


def _step_fn(model: nn.Module, params: Any) -> sampling.StepFn:
    def step(cache, token_Bx1, _positions_Bx1):
        return t5_decode.decode_step(model, params, cache, token_Bx1[:, 0])

    return step


@partial(jax.jit, static_argnames=("model", "opts", "eos_id", "pad_id"))
def _sample(model, params, ids_BxS, segments_BxS, seed, opts, eos_id, pad_id):
    n = opts.max_new_tokens
    logits_BxV, cache = _start(model, params, ids_BxS, segments_BxS, n, pad_id)
    zeros_B = jnp.zeros((ids_BxS.shape[0],), jnp.int32)
    tokens_BxN, _ = sampling.sample_loop(
        _step_fn(model, params), logits_BxV, cache, zeros_B, opts.sampling, n, eos_id, pad_id,
        jax.random.key(seed),
    )  # fmt: skip
    return tokens_BxN


@partial(jax.jit, static_argnames=("model", "opts", "eos_id", "pad_id"))
def _beams(model, params, ids_BxS, segments_BxS, opts, eos_id, pad_id):
    n, w = opts.max_new_tokens, opts.num_beams
    logits_BxV, cache = _start(model, params, ids_BxS, segments_BxS, n, pad_id)
    # Row b's beams at b*W + w, the encoder's output and cross K/V copied, not recomputed.
    cache = jax.tree.map(lambda x: jnp.repeat(x, w, axis=0) if x.ndim else x, cache)
    zeros_B = jnp.zeros((ids_BxS.shape[0],), jnp.int32)
    return beam.beam_search(
        _step_fn(model, params), logits_BxV, cache, zeros_B, w, n, eos_id, pad_id,
        opts.length_penalty,
    )  # fmt: skip


@partial(jax.jit, static_argnames=("model", "n", "start_id"))
def _greedy_uncached(model, params, ids_BxS, segments_BxS, n, start_id):
    """The reference without any cache: every step re-runs the encoder and the decoder over
    the whole prefix (padded to ``n``; the decoder is causal, so padding after a position
    never changes it)."""
    batch = ids_BxS.shape[0]

    def step(i, dec_BxN1):
        logits_BxNxV = model.apply({"params": params}, ids_BxS, dec_BxN1[:, :n], segments_BxS)
        token_B = jnp.argmax(logits_BxNxV[:, i], axis=-1).astype(jnp.int32)
        return dec_BxN1.at[:, i + 1].set(token_B)

    dec_BxN1 = jnp.full((batch, n + 1), start_id, jnp.int32)
    return jax.lax.fori_loop(0, n, step, dec_BxN1)[:, 1:]


def bench_seq2seq_decode(
    model: nn.Module, params: Any, batch: int, prompt: int, opts: Any, vocab: int, repeats: int
) -> dict[str, Any]:
    """Greedy decoding of ``opts.max_new_tokens`` tokens (``opts``: greedy GenerateOptions)
    for ``batch`` random prompts of ``prompt`` tokens: the cached path (encoder and cross K/V
    once, self-attention KV cache) against re-running the whole model for every token. Best
    of ``repeats`` after a compile run."""
    import time

    prompts = np.random.default_rng(0).integers(7, vocab, (batch, prompt)).tolist()
    ids, segments = (jnp.asarray(x) for x in encoder_inputs(prompts, 1, 0, prompt + 1))
    n, plain = opts.max_new_tokens, dataclasses.replace(opts, seed=0, stop_at_eos=False)
    runs = {
        True: lambda: _sample(model, params, ids, segments, jnp.uint32(0), opts=plain,
                              eos_id=None, pad_id=0),
        False: lambda: _greedy_uncached(model, params, ids, segments, n=n, start_id=0),
    }  # fmt: skip
    times, tokens = {}, {}
    for cached, run in runs.items():
        tokens[cached] = jax.device_get(run())  # compile
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            best = min(best, time.perf_counter() - t0)
        times[cached] = best
    return {
        "batch": batch,
        "prompt": prompt,
        "new_tokens": n,
        "kv_tokens_per_s": batch * n / times[True],
        "recompute_tokens_per_s": batch * n / times[False],
        "speedup": times[False] / times[True],
        "same_tokens": bool(np.array_equal(tokens[True], tokens[False])),
    }


def generate_seq2seq_ids(
    model: nn.Module,
    params: Any,
    prompts: list[list[int]],
    opts: Any,
    eos_id: int,
    pad_id: int,
    context: int,
) -> tuple[list[list[int]], list[float] | None]:
    """(new token ids per prompt without the final ``</s>``, beam scores or None) for
    ``opts`` (a :class:`flaxlm.tools.generate.GenerateOptions`)."""
    ids, segments = encoder_inputs(prompts, eos_id, pad_id, context)
    stop = eos_id if opts.stop_at_eos else None
    args = (jnp.asarray(ids), jnp.asarray(segments))
    scores = None
    if opts.num_beams > 1:
        result = _beams(model, params, *args, opts=opts, eos_id=stop, pad_id=pad_id)
        tokens = jax.device_get(result.tokens_BxWxN[:, 0])
        scores = [float(s) for s in jax.device_get(result.scores_BxW[:, 0])]
    else:
        seed = jnp.asarray(opts.seed, jnp.uint32)  # traced: a new seed does not recompile
        plain = dataclasses.replace(opts, seed=0)
        tokens = jax.device_get(
            _sample(model, params, *args, seed, opts=plain, eos_id=stop, pad_id=pad_id)
        )
    out = []
    for row in tokens.tolist():
        if stop is not None and stop in row:
            row = row[: row.index(stop)]
        out.append(row)
    return out, scores


def text_decoder(loaded: Any) -> Callable[[list[int]], str]:
    """How ``generate`` turns a checkpoint's output ids into text: sentinels (ids past the
    tokenizer's vocabulary) read ``<extra_id_i>``."""
    from flaxlm.families.t5 import decode_with_sentinels

    return partial(decode_with_sentinels, loaded.cfg, loaded.tokenizer)
