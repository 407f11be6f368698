"""Greedy generation for ``generate_until`` requests, through the model's KV cache.

As the harness's HF model does: each context keeps its last ``max_length - max_gen_toks``
tokens; the model continues it greedily for up to ``max_gen_toks`` tokens or until ``</s>``;
the text is then cut at the first of the stop strings. Contexts are left-padded (padding has
segment id 0, positions count real tokens only) into batches of the scorer's batch size and
padded to a multiple of ``BUCKET`` tokens; one jitted prefill + ``fori_loop`` per (batch
width, max_gen_toks), sharded over the mesh's batch axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxlm.parallel.sharding import LOGICAL_RULES, batch_sharding, replicated
from flaxlm.tasks.spec import TaskError

BUCKET = 32  # rows (and prompts) are padded to a multiple of this many tokens
TOKEN_SEGMENT = 1  # segment id of real tokens; padding is 0 and is never attended to


def greedy_generate(scorer: Any, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]:
    """``requests``: ``(context, stop strings, max_gen_toks)``; returns the texts."""
    tok, out = scorer.tokenizer, [""] * len(requests)
    groups: dict[int, list[int]] = {}
    for i, (_, _, n) in enumerate(requests):
        if not 0 < n < scorer.max_length:
            raise TaskError(f"max_gen_toks={n} must be in 1..{scorer.max_length - 1}")
        groups.setdefault(int(n), []).append(i)
    for n, members in groups.items():
        keep = scorer.max_length - n
        prompts = {i: (tok.encode(requests[i][0]) or [scorer.prefix_id])[-keep:] for i in members}
        members.sort(key=lambda i: -len(prompts[i]))
        for start in range(0, len(members), scorer.batch_size):
            chunk = members[start : start + scorer.batch_size]
            ids = _generate_batch(scorer, [prompts[i] for i in chunk], n)
            for i, row in zip(chunk, ids, strict=False):
                out[i] = cut_at_stops(tok.decode(row), requests[i][1])
    return out


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of each stop string in turn (the harness's cut)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def _generate_batch(scorer: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    batch, width = scorer.batch_size, -(-max(map(len, prompts)) // BUCKET) * BUCKET
    tokens = np.zeros((batch, width), np.int32)
    positions = np.zeros((batch, width), np.int32)
    segments = np.zeros((batch, width), np.int32)
    lengths = np.ones(batch, np.int32)
    tokens[:, -1], segments[:, -1] = scorer.prefix_id, TOKEN_SEGMENT  # filler rows
    for row, prompt in enumerate(prompts):
        k = len(prompt)
        tokens[row, width - k :] = prompt
        positions[row, width - k :] = np.arange(k)
        segments[row] = 0
        segments[row, width - k :] = TOKEN_SEGMENT
        lengths[row] = k
    sharding = batch_sharding(scorer.mesh)
    args = [
        jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx])
        for a in (tokens, positions, segments, np.broadcast_to(lengths[:, None], (batch, 1)))
    ]
    eos = scorer.tokenizer.eos_id
    with jax.set_mesh(scorer.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        out = np.asarray(jax.device_get(_compiled(scorer, n)(scorer.loaded.params, *args)))
    ids = []
    for row in out[: len(prompts)].tolist():
        ids.append(row[: row.index(eos)] if eos in row else row)
    return ids


def _greedy(model, n: int, params, tokens_BxP, positions_BxP, segments_BxP, lengths_Bx1):
    """Prefill the left-padded prompts into a cache of ``P + n`` slots, then ``n - 1`` more
    greedy steps; returns the ``(B, n)`` new tokens."""
    batch, width = tokens_BxP.shape
    init = partial(model.init, decode=True)
    shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((batch, width + n), jnp.int32))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def step(cache, tokens, positions, segments):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens, positions, segments,
            decode=True, mutable=["cache"],
        )  # fmt: skip
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), variables["cache"]

    first_B, cache = step(cache, tokens_BxP, positions_BxP, segments_BxP)
    out_BxN = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(first_B)
    ones_Bx1 = jnp.full((batch, 1), TOKEN_SEGMENT, jnp.int32)

    def body(i, carry):
        out_BxN, cache = carry
        token_Bx1 = jax.lax.dynamic_slice_in_dim(out_BxN, i - 1, 1, axis=1)
        next_B, cache = step(cache, token_Bx1, lengths_Bx1 + i - 1, ones_Bx1)
        return out_BxN.at[:, i].set(next_B), cache

    out_BxN, _ = jax.lax.fori_loop(1, n, body, (out_BxN, cache))
    return out_BxN


def _compiled(scorer: Any, n: int):
    """The jitted generator for ``n`` new tokens, kept on the scorer (one per n)."""
    fns = scorer.__dict__.setdefault("_generators", {})
    if n not in fns:
        fn = partial(_greedy, scorer.loaded.model, n)
        fns[n] = jax.jit(fn, out_shardings=replicated(scorer.mesh))
    return fns[n]
