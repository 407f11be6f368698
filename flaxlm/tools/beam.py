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
    flat = batch * W
    positions_BW = jnp.repeat(next_positions_B, W)
    lp_max = length_penalty(jnp.asarray(N), alpha)

    def best_possible_B(live_logp_BxW, step):
        # Log-probs only fall as a beam grows; lp is monotone in the length, so a live beam's
        # best reachable score is its current log-prob over lp at one of the two ends.
        best_B = live_logp_BxW.max(-1)
        lp_next = length_penalty(step + 1, alpha)
        return jnp.maximum(best_B / lp_next, best_B / lp_max)

    def cond(carry):
        step, _, live_logp_BxW, _, fin_scores_BxW, _, _, _ = carry
        full_B = jnp.all(fin_scores_BxW > -jnp.inf, axis=-1)
        settled_B = full_B & (fin_scores_BxW.min(-1) >= best_possible_B(live_logp_BxW, step))
        return (step < N) & ~jnp.all(settled_B)

    def body(carry):
        step, live_BxWxN, live_logp_BxW, logits_BWxV, fin_scores, fin_BxWxN, fin_len, st = carry
        logp_BxWxV = jax.nn.log_softmax(logits_BWxV.astype(jnp.float32)).reshape(batch, W, vocab)
        cand_Bx2W, index_Bx2W = jax.lax.top_k(
            (live_logp_BxW[..., None] + logp_BxWxV).reshape(batch, W * vocab), 2 * W
        )
        parent_Bx2W, token_Bx2W = index_Bx2W // vocab, (index_Bx2W % vocab).astype(jnp.int32)
        seqs_Bx2WxN = jnp.take_along_axis(live_BxWxN, parent_Bx2W[..., None], axis=1)
        seqs_Bx2WxN = seqs_Bx2WxN.at[:, :, step].set(token_Bx2W)
        ends_Bx2W = (
            (token_Bx2W == eos_id) if eos_id is not None else jnp.zeros_like(cand_Bx2W, bool)
        )

        # Hypotheses that just ended compete with the finished ones for the W places.
        new_scores_Bx2W = jnp.where(
            ends_Bx2W, cand_Bx2W / length_penalty(step + 1, alpha), -jnp.inf
        )
        fin_scores, fin_BxWxN, fin_len = _top_w(
            W,
            jnp.concatenate([fin_scores, new_scores_Bx2W], axis=1),
            jnp.concatenate([fin_BxWxN, seqs_Bx2WxN], axis=1),
            jnp.concatenate([fin_len, jnp.full_like(token_Bx2W, step + 1)], axis=1),
        )

        # The W best extensions that did not end stay live.
        live_logp_BxW, keep_BxW = jax.lax.top_k(jnp.where(ends_Bx2W, -jnp.inf, cand_Bx2W), W)
        live_BxWxN = jnp.take_along_axis(seqs_Bx2WxN, keep_BxW[..., None], axis=1)
        parent_BxW = jnp.take_along_axis(parent_Bx2W, keep_BxW, axis=1)
        token_BxW = jnp.take_along_axis(token_Bx2W, keep_BxW, axis=1)
        rows_BW = (jnp.arange(batch)[:, None] * W + parent_BxW).reshape(flat)
        st = gather_beams(st, rows_BW)
        logits_BWxV, st = step_fn(st, token_BxW.reshape(flat, 1), (positions_BW + step)[:, None])
        return step + 1, live_BxWxN, live_logp_BxW, logits_BWxV, fin_scores, fin_BxWxN, fin_len, st

    # All W beams start as copies of the prompt; only the first is live, so step 0 expands it
    # alone instead of W identical ones.
    live_logp_BxW = jnp.full((batch, W), -jnp.inf).at[:, 0].set(0.0)
    carry = (
        jnp.zeros((), jnp.int32),
        jnp.full((batch, W, N), pad_id, jnp.int32),
        live_logp_BxW,
        jnp.repeat(first_logits_BxV, W, axis=0),
        jnp.full((batch, W), -jnp.inf),
        jnp.full((batch, W, N), pad_id, jnp.int32),
        jnp.zeros((batch, W), jnp.int32),
        state,
    )
    steps, live_BxWxN, live_logp_BxW, _, fin_scores, fin_BxWxN, fin_len, _ = jax.lax.while_loop(
        cond, body, carry
    )
    # Live beams compete too: at max_new_tokens they are complete, and a row may have fewer
    # than W finished hypotheses.
    scores, tokens, lengths = _top_w(
        W,
        jnp.concatenate([fin_scores, live_logp_BxW / length_penalty(steps, alpha)], axis=1),
        jnp.concatenate([fin_BxWxN, live_BxWxN], axis=1),
        jnp.concatenate([fin_len, jnp.full_like(fin_len, steps)], axis=1),
    )
    return BeamResult(tokens, scores, lengths)


def _top_w(w: int, scores_BxM: Array, seqs_BxMxN: Array, lengths_BxM: Array):
    """The ``w`` best of M hypotheses per row, best first."""
    top_BxW, index_BxW = jax.lax.top_k(scores_BxM, w)
    seqs = jnp.take_along_axis(seqs_BxMxN, index_BxW[..., None], axis=1)
    return top_BxW, seqs, jnp.take_along_axis(lengths_BxM, index_BxW, axis=1)
