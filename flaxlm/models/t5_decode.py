"""Cached decoding for T5 (flaxlm/models/t5.py): the encoder runs once, each decoder block's
cross-attention keys and values are computed once from its output, and the decoder's
self-attention keeps a KV cache; then one token per row per step.

    encoded_BxSxD = encode(model, params, enc_ids_BxS, enc_segments_BxS)
    cache = init_cache(model, params, encoded_BxSxD, enc_segments_BxS, max_len=64)
    token_B = jnp.zeros((B,), jnp.int32)            # T5's decoder start token: pad (0)
    for _ in range(64):
        logits_BxV, cache = decode_step(model, params, cache, token_B)
        token_B = jnp.argmax(logits_BxV, -1)

The cache is a plain pytree whose every array leaf has the batch on axis 0 except
``cache["index"]`` (a scalar: the decoder position of the next token), so beam search
reorders it with a gather on axis 0 of those leaves:

- ``layers``: one dict per decoder block, ``key`` / ``value`` ``(B, max_len, N, K)`` (self
  attention, filled up to ``index``) and ``cross_key`` / ``cross_value`` ``(B, S, N, K)``;
  with ``model.scan_layers`` one such dict whose arrays have the layers on axis 1
  (``(B, layers, max_len, N, K)``), which the scanned decoder steps through;
- ``encoder_segment_ids`` ``(B, S)``: which encoder positions are real (0 = padding);
- ``index``: int32 scalar.

All three functions are pure and jit-able (``model`` static). Rows are single (unpacked)
examples: the decoder's positions are ``0, 1, ...``; prompts are right-padded (encoder
segment 0 after the prompt), which the encoder and the cross-attention never see.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from flaxlm.models.layers import Array
from flaxlm.models.t5 import T5


def encode(model: T5, params: Any, enc_ids_BxS: Array, enc_segments_BxS: Array) -> Array:
    """The encoder's output ``encoded_BxSxD`` for the prompts (run once per prompt batch)."""
    return model.apply({"params": params}, enc_ids_BxS, enc_segments_BxS, method=T5.encode)


def init_cache(
    model: T5, params: Any, encoded_BxSxD: Array, enc_segments_BxS: Array, max_len: int
) -> dict[str, Any]:
    """A cache for up to ``max_len`` decoder tokens: empty self-attention slots, and each
    block's cross-attention keys and values of ``encoded`` (computed here, once)."""
    cfg = model.cfg
    kv = model.apply({"params": params}, encoded_BxSxD, method=T5.decoder_kv)
    batch = encoded_BxSxD.shape[0]
    head_dim = cfg.d_model // cfg.n_heads
    kv_heads = cfg.n_kv_heads or cfg.n_heads
    dtype = jnp.dtype(cfg.dtype)
    if cfg.scan_layers:  # one dict, the layers on axis 1 (k, v: (B, layers, S, N, K))
        k_BxNLxSxNxK, v_BxNLxSxNxK = kv
        slots = (batch, k_BxNLxSxNxK.shape[1], max_len, kv_heads, head_dim)
        layers: Any = {
            "key": jnp.zeros(slots, dtype),
            "value": jnp.zeros(slots, dtype),
            "cross_key": k_BxNLxSxNxK,
            "cross_value": v_BxNLxSxNxK,
        }
    else:
        layers = [
            {
                "key": jnp.zeros((batch, max_len, kv_heads, head_dim), dtype),
                "value": jnp.zeros((batch, max_len, kv_heads, head_dim), dtype),
                "cross_key": k_BxSxNxK,
                "cross_value": v_BxSxNxK,
            }
            for k_BxSxNxK, v_BxSxNxK in kv
        ]
    return {
        "layers": layers,
        "encoder_segment_ids": enc_segments_BxS.astype(jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def decode_step(
    model: T5, params: Any, cache: dict[str, Any], token_B: Array
) -> tuple[Array, dict[str, Any]]:
    """Feeds ``token_B`` (int32, one per row) at decoder position ``cache["index"]``.
    Returns float32 ``logits_BxV`` of the next token and the advanced cache."""
    index = cache["index"]
    logits_BxV, layers = model.apply(
        {"params": params},
        token_B.astype(jnp.int32),
        cache["layers"],
        index,
        cache["encoder_segment_ids"],
        method=T5.step,
    )
    return logits_BxV, {**cache, "layers": layers, "index": index + 1}


def greedy(
    model: T5,
    params: Any,
    enc_ids_BxS: Array,
    enc_segments_BxS: Array,
    steps: int,
    start_id: int = 0,
) -> Array:
    """``steps`` greedy tokens per row ``(B, steps)`` after the start token ``start_id`` (T5:
    pad); a loop over the three functions above (no early stop at end-of-sequence)."""
    encoded = encode(model, params, enc_ids_BxS, enc_segments_BxS)
    cache = init_cache(model, params, encoded, enc_segments_BxS, steps)

    def one(carry, _):
        token_B, cache = carry
        logits_BxV, cache = decode_step(model, params, cache, token_B)
        nxt = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        return (nxt, cache), nxt

    start = jnp.full((enc_ids_BxS.shape[0],), start_id, jnp.int32)
    _, tokens_SxB = jax.lax.scan(one, (start, cache), None, length=steps)
    return tokens_SxB.T
