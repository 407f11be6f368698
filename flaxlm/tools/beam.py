"""Batched beam search with the GNMT length penalty, over any KV-cached step function.

Shapes: B batch rows, W beams, V vocab, N new tokens. The decoding state (the KV cache) holds
B*W rows, beam ``w`` of row ``b`` at ``b*W + w``; after each step its rows are gathered so each
surviving beam carries its parent's cache.

A finished hypothesis (one that emitted ``</s>``) is scored ``log p(y) / lp(|y|)`` with
``lp(n) = ((5 + n) / 6) ** alpha`` (Wu et al. 2016, GNMT), ``|y|`` counting the ``</s>``.
Each step keeps the 2W best extensions, so W live beams remain even when up to W of them end.
A row stops once it holds W finished hypotheses that no live beam can still beat; at
``max_new_tokens`` the live beams join the finished ones, scored the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from flaxlm.tools.sampling import StepFn

Array = jax.Array


@dataclass(frozen=True)
class BeamResult:
    """``tokens_BxWxN`` best first (``pad_id`` after the end), ``scores_BxW`` (length-penalised
    log-probabilities), ``lengths_BxW`` (new tokens, the ``</s>`` included)."""

    tokens_BxWxN: Array
    scores_BxW: Array
    lengths_BxW: Array


jax.tree_util.register_dataclass(
    BeamResult, data_fields=["tokens_BxWxN", "scores_BxW", "lengths_BxW"], meta_fields=[]
)


def length_penalty(length: Array, alpha: float) -> Array:
    """GNMT ``lp(n) = ((5 + n) / 6) ** alpha``; alpha 0 ranks by total log-probability."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def gather_beams(state: Any, rows: Array) -> Any:
    """Reorders every array of ``state`` whose leading axis is the B*W rows (scalars such as
    the cache index are shared and kept)."""
    n = rows.shape[0]
    return jax.tree.map(lambda x: x[rows] if x.ndim and x.shape[0] == n else x, state)


@dataclass(frozen=True)
class _Search:
    """The while-loop carry: ``step`` new tokens so far; the W live beams per row (their
    tokens, log-probabilities, next-token logits and decoding state, B*W rows); the W best
    ``finished`` hypotheses (scores -inf until found)."""

    step: Array
    live_BxWxN: Array
    live_logp_BxW: Array
    logits_BWxV: Array
    finished: BeamResult
    state: Any


jax.tree_util.register_dataclass(
    _Search,
    data_fields=["step", "live_BxWxN", "live_logp_BxW", "logits_BWxV", "finished", "state"],
    meta_fields=[],
)


def beam_search(
    step_fn: StepFn,
    first_logits_BxV: Array,
    state: Any,
    next_positions_B: Array,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    alpha: float = 0.6,
) -> BeamResult:
    """Beam search from the logits after each row's prompt.

    Args: ``first_logits_BxV`` and ``next_positions_B`` per prompt row; ``state`` the decoding
    state after the prompt with B*W rows (each prompt row repeated W times, e.g.
    ``jnp.repeat(x, W, axis=0)``); ``eos_id`` None never ends a hypothesis; ``alpha`` the GNMT
    length-penalty exponent.
    """
    batch, vocab = first_logits_BxV.shape
    W, N = num_beams, max_new_tokens
    if 2 * W > vocab:
        raise ValueError(f"num_beams={W} needs a vocab of at least {2 * W}, got {vocab}")
    positions_BW = jnp.repeat(next_positions_B, W)

    def cond(search: _Search) -> Array:
        return (search.step < N) & ~jnp.all(_settled_B(search, N, alpha))

    def body(search: _Search) -> _Search:
        return _advance(search, step_fn, positions_BW, eos_id, alpha)

    # All W beams start as copies of the prompt; only the first is live, so step 0 expands it
    # alone instead of W identical ones.
    start = _Search(
        step=jnp.zeros((), jnp.int32),
        live_BxWxN=jnp.full((batch, W, N), pad_id, jnp.int32),
        live_logp_BxW=jnp.full((batch, W), -jnp.inf).at[:, 0].set(0.0),
        logits_BWxV=jnp.repeat(first_logits_BxV, W, axis=0),
        finished=BeamResult(
            tokens_BxWxN=jnp.full((batch, W, N), pad_id, jnp.int32),
            scores_BxW=jnp.full((batch, W), -jnp.inf),
            lengths_BxW=jnp.zeros((batch, W), jnp.int32),
        ),
        state=state,
    )
    end = jax.lax.while_loop(cond, body, start)
    # Live beams compete too: at max_new_tokens they are complete, and a row may have fewer
    # than W finished hypotheses.
    return _best_w(
        end.finished,
        end.live_logp_BxW / length_penalty(end.step, alpha),
        end.live_BxWxN,
        jnp.full_like(end.finished.lengths_BxW, end.step),
    )


def _settled_B(search: _Search, max_new_tokens: int, alpha: float) -> Array:
    """Per row: it holds W finished hypotheses and no live beam can still beat the worst."""
    # Log-probs only fall as a beam grows; lp is monotone in the length, so a live beam's
    # best reachable score is its current log-prob over lp at one of the two ends.
    best_B = search.live_logp_BxW.max(-1)
    lp_next = length_penalty(search.step + 1, alpha)
    lp_max = length_penalty(jnp.asarray(max_new_tokens), alpha)
    best_possible_B = jnp.maximum(best_B / lp_next, best_B / lp_max)
    fin_scores_BxW = search.finished.scores_BxW
    full_B = jnp.all(fin_scores_BxW > -jnp.inf, axis=-1)
    return full_B & (fin_scores_BxW.min(-1) >= best_possible_B)


def _advance(
    search: _Search, step_fn: StepFn, positions_BW: Array, eos_id: int | None, alpha: float
) -> _Search:
    """One token more: the 2W best extensions of the live beams; those that end join the
    finished hypotheses, the W best others stay live and are decoded one step further."""
    step = search.step
    batch, W, _ = search.live_BxWxN.shape
    vocab = search.logits_BWxV.shape[-1]
    logp_BxWxV = jax.nn.log_softmax(search.logits_BWxV.astype(jnp.float32))
    logp_BxWxV = logp_BxWxV.reshape(batch, W, vocab)
    cand_Bx2W, index_Bx2W = jax.lax.top_k(
        (search.live_logp_BxW[..., None] + logp_BxWxV).reshape(batch, W * vocab), 2 * W
    )
    parent_Bx2W, token_Bx2W = index_Bx2W // vocab, (index_Bx2W % vocab).astype(jnp.int32)
    seqs_Bx2WxN = jnp.take_along_axis(search.live_BxWxN, parent_Bx2W[..., None], axis=1)
    seqs_Bx2WxN = seqs_Bx2WxN.at[:, :, step].set(token_Bx2W)
    ends_Bx2W = (token_Bx2W == eos_id) if eos_id is not None else jnp.zeros_like(cand_Bx2W, bool)

    # Hypotheses that just ended compete with the finished ones for the W places.
    finished = _best_w(
        search.finished,
        jnp.where(ends_Bx2W, cand_Bx2W / length_penalty(step + 1, alpha), -jnp.inf),
        seqs_Bx2WxN,
        jnp.full_like(token_Bx2W, step + 1),
    )

    # The W best extensions that did not end stay live.
    live_logp_BxW, keep_BxW = jax.lax.top_k(jnp.where(ends_Bx2W, -jnp.inf, cand_Bx2W), W)
    parent_BxW = jnp.take_along_axis(parent_Bx2W, keep_BxW, axis=1)
    token_BxW = jnp.take_along_axis(token_Bx2W, keep_BxW, axis=1)
    rows_BW = (jnp.arange(batch)[:, None] * W + parent_BxW).reshape(batch * W)
    state = gather_beams(search.state, rows_BW)
    logits_BWxV, state = step_fn(
        state, token_BxW.reshape(batch * W, 1), (positions_BW + step)[:, None]
    )
    return _Search(
        step=step + 1,
        live_BxWxN=jnp.take_along_axis(seqs_Bx2WxN, keep_BxW[..., None], axis=1),
        live_logp_BxW=live_logp_BxW,
        logits_BWxV=logits_BWxV,
        finished=finished,
        state=state,
    )


def _best_w(
    best: BeamResult, scores_BxM: Array, tokens_BxMxN: Array, lengths_BxM: Array
) -> BeamResult:
    """The W best, best first, of the hypotheses in ``best`` and M more (W = ``best``'s)."""
    w = best.scores_BxW.shape[1]
    scores = jnp.concatenate([best.scores_BxW, scores_BxM], axis=1)
    top_BxW, index_BxW = jax.lax.top_k(scores, w)
    tokens = jnp.concatenate([best.tokens_BxWxN, tokens_BxMxN], axis=1)
    lengths = jnp.concatenate([best.lengths_BxW, lengths_BxM], axis=1)
    return BeamResult(
        tokens_BxWxN=jnp.take_along_axis(tokens, index_BxW[..., None], axis=1),
        scores_BxW=top_BxW,
        lengths_BxW=jnp.take_along_axis(lengths, index_BxW, axis=1),
    )
