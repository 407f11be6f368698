"""Task requests on an encoder-decoder (``TaskScoring`` kind ``seq2seq``, the ``t5`` family):
targets given inputs, as lm-evaluation-harness's HF model runs a seq2seq model.

- **log-likelihood**: the context is the encoder input (its tokens then ``</s>``, as T5's
  tokenizer encodes it and as flaxlm trains on pairs), the continuation, encoded on its own, is
  the decoder's target: the decoder reads the start token (pad) and the continuation shifted
  right, and each target token's log-probability is summed. An empty context is ``</s>``.
- **rolling log-likelihood**: the harness's definition for seq2seq models: the same disjoint
  windows as a decoder (flaxlm/tasks/scorer.py ``rolling_windows``), each window the decoder's
  target and what precedes it (``</s>`` for the first window) the encoder input. Every token is
  predicted once from a normalised distribution, so the sum is a log-likelihood of the document;
  the encoder sees little of it, so compare such numbers between encoder-decoders only.
- **generate-until**: greedy decoding through T5's cached decoder (flaxlm/models/t5_decode.py:
  the encoder once, cross-attention keys and values once, a self-attention KV cache), up to
  ``max_gen_toks`` tokens or ``</s>``; sentinels (ids past the tokenizer's vocabulary) read
  ``<extra_id_N>`` as ``flaxlm generate`` writes them; then cut at the stop strings.

Inputs longer than the scorer's ``max_length`` keep their last ``max_length`` tokens (the
harness's truncation); rows are right-padded to a multiple of ``BUCKET`` tokens, encoder and
decoder each to their own width (padding: segment 0, never attended to, never scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from flaxlm.families.t5 import decode_with_sentinels
from flaxlm.models import t5_decode
from flaxlm.parallel.sharding import LOGICAL_RULES, batch_sharding, replicated
from flaxlm.tasks.generation import BUCKET, TOKEN_SEGMENT, cut_at_stops
from flaxlm.tasks.spec import TaskError

ENCODER_KEYS = ("encoder_ids", "encoder_segment_ids", "encoder_positions")


def seq2seq_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(encoder input, target)`` ids of a request: the harness's seq2seq split (trailing
    spaces of the context move to the continuation; each part encoded on its own) with
    ``</s>`` ending the encoder input."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tok.encode(context) if context else []
    return [*ctx, tok.eos_id], tok.encode(continuation)


def seq2seq_row(
    ctx: list[int], cont: list[int], max_length: int, start_id: int
) -> dict[str, np.ndarray]:
    """One request as a row: encoder ``ctx[-max_length:]``; decoder input the start token and
    the target shifted right; every target token scored."""
    enc, target = list(ctx)[-max_length:], list(cont)[-max_length:]
    if not enc:
        raise TaskError("an encoder-decoder request needs a non-empty encoder input")
    n, t = len(enc), len(target)
    return {
        "encoder_ids": np.asarray(enc, np.int32),
        "encoder_segment_ids": np.full(n, TOKEN_SEGMENT, np.int32),
        "encoder_positions": np.arange(n, dtype=np.int32),
        "decoder_input_ids": np.asarray([start_id, *target[:-1]], np.int32),
        "decoder_target_ids": np.asarray(target, np.int32),
        "decoder_segment_ids": np.full(t, TOKEN_SEGMENT, np.int32),
        "decoder_positions": np.arange(t, dtype=np.int32),
        "score_mask": np.ones(t, np.int32),
    }


def bucketed(longest: int, max_length: int) -> int:
    """``longest`` rounded up to a multiple of ``BUCKET``, at most ``max_length``."""
    return min(-(-longest // BUCKET) * BUCKET, max_length)


def pad_seq2seq_rows(
    rows: list[dict[str, np.ndarray]], batch: int, max_length: int
) -> dict[str, np.ndarray]:
    """``(batch, S)`` encoder and ``(batch, T)`` decoder arrays, each side right-padded to a
    bucket of its longest row (padding 0: token pad, segment 0, not scored); missing rows are
    all padding."""
    widths = {
        side: bucketed(max(len(r[key]) for r in rows), max_length)
        for side, key in (("encoder", "encoder_ids"), ("decoder", "decoder_target_ids"))
    }
    out = {}
    for key in rows[0]:
        arr = np.zeros((batch, widths["encoder" if key in ENCODER_KEYS else "decoder"]), np.int32)
        for i, row in enumerate(rows):
            arr[i, : len(row[key])] = row[key]
        out[key] = arr
    return out


def seq2seq_generate(scorer: Any, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]:
    """``requests``: ``(context, stop strings, max_gen_toks)``; the greedy texts (module doc)."""
    tok, out = scorer.tokenizer, [""] * len(requests)
    groups: dict[int, list[int]] = {}
    for i, (_, _, n) in enumerate(requests):
        if n < 1:
            raise TaskError(f"max_gen_toks={n} must be at least 1")
        groups.setdefault(int(n), []).append(i)
    for n, members in groups.items():
        # the context as it is (no trailing-space move), then </s>; its last max_length tokens
        prompts = {i: [*tok.encode(requests[i][0]), tok.eos_id][-scorer.max_length :]
                   for i in members}  # fmt: skip
        members.sort(key=lambda i: -len(prompts[i]))
        for start in range(0, len(members), scorer.batch_size):
            chunk = members[start : start + scorer.batch_size]
            ids = _generate_batch(scorer, [prompts[i] for i in chunk], n)
            for i, row in zip(chunk, ids, strict=False):
                text = decode_with_sentinels(scorer.loaded.cfg, tok, row)  # as flaxlm generate
                out[i] = cut_at_stops(text, requests[i][1])
    return out


def _generate_batch(scorer: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    tok, batch = scorer.tokenizer, scorer.batch_size
    width = bucketed(max(map(len, prompts)), scorer.max_length)
    ids = np.full((batch, width), tok.pad_id, np.int32)
    segments = np.zeros((batch, width), np.int32)
    ids[:, 0], segments[:, 0] = tok.eos_id, TOKEN_SEGMENT  # filler rows: "</s>"
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
        segments[row, : len(prompt)] = TOKEN_SEGMENT
    sharding = batch_sharding(scorer.mesh)
    args = [
        jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx])
        for a in (ids, segments)
    ]
    fns = scorer.__dict__.setdefault("_seq2seq_generators", {})
    if n not in fns:
        model, start = scorer.loaded.model, tok.pad_id  # T5's decoder start token

        def greedy(params, ids_BxS, segments_BxS):
            return t5_decode.greedy(model, params, ids_BxS, segments_BxS, n, start)

        fns[n] = jax.jit(greedy, out_shardings=replicated(scorer.mesh))
    with jax.set_mesh(scorer.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        out = np.asarray(jax.device_get(fns[n](scorer.loaded.params, *args)))
    rows = []
    for row in out[: len(prompts)].tolist():
        rows.append(row[: row.index(tok.eos_id)] if tok.eos_id in row else row)
    return rows
