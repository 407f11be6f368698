"""Token choice for generation: temperature, top-k and top-p filters, and the sampling loop.

Shapes: B batch rows, V vocab, N new tokens. Filters set the logits of excluded tokens to
``-inf``; they compose in the order temperature -> top-k -> top-p (as HuggingFace does), so
top-p measures its mass on the temperature-scaled, top-k-filtered distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
# (state, tokens_Bx1, positions_Bx1) -> (logits_BxV, state): one decoding step with a KV cache.
StepFn = Callable[[Any, Array, Array], tuple[Array, Any]]


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen. ``temperature=0`` is greedy (top-k/top-p then unused);
    ``top_k=0`` and ``top_p=1`` switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def top_k_filter(logits_BxV: Array, k: int) -> Array:
    """Keeps the ``k`` largest logits of each row (and any tied with the k-th); 0 = all."""
    if k <= 0 or k >= logits_BxV.shape[-1]:
        return logits_BxV
    kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][..., -1:]
    return jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)


def top_p_filter(logits_BxV: Array, p: float) -> Array:
    """Nucleus filter: keeps the most likely tokens, in order, until their probability mass
    reaches ``p`` (the token that crosses ``p`` is kept, so the top token always is)."""
    if p >= 1.0:
        return logits_BxV
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[..., ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = mass_before_BxV < p
    threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def filter_logits(logits_BxV: Array, opts: SamplingOptions) -> Array:
    """Temperature, then top-k, then top-p: the logits that sampling draws from."""
    logits_BxV = logits_BxV.astype(jnp.float32) / max(opts.temperature, 1e-6)
    return top_p_filter(top_k_filter(logits_BxV, opts.top_k), opts.top_p)


def choose_tokens(logits_BxV: Array, opts: SamplingOptions, rng: Array, step: Array) -> Array:
    """One token per row. Row ``b`` at step ``n`` draws with key ``fold_in(fold_in(rng, b), n)``,
    so a row's sample does not depend on the other rows of the batch."""
    if opts.greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    filtered_BxV = filter_logits(logits_BxV, opts)
    rows_B = jnp.arange(logits_BxV.shape[0])
    keys_B = jax.vmap(lambda b: jax.random.fold_in(jax.random.fold_in(rng, b), step))(rows_B)
    return jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)


def sample_loop(
    step_fn: StepFn,
    first_logits_BxV: Array,
    state: Any,
    next_positions_B: Array,
    opts: SamplingOptions,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    rng: Array,
    done_B: Array | None = None,
    first_step: int = 0,
) -> tuple[Array, Array]:
    """Decodes up to ``max_new_tokens`` tokens per row inside one ``lax.while_loop``.

    Args: ``first_logits_BxV`` the logits after the prompt; ``state`` what ``step_fn`` needs
    (the KV cache after prefill); ``next_positions_B`` the position of each row's first new
    token; ``eos_id`` ends a row (None = never); ``done_B`` rows already ended; ``first_step``
    numbers the steps for the RNG when this loop continues an earlier one.

    Returns ``(tokens_BxN, done_B)``: new tokens (``pad_id`` once a row has ended) and which
    rows have ended. Stops early once every row has.
    """
    batch = first_logits_BxV.shape[0]

    def cond(carry):
        step, _, _, _, done_B = carry
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        step, state, logits_BxV, tokens_BxN, done_B = carry
        token_B = choose_tokens(logits_BxV, opts, rng, first_step + step)
        token_B = jnp.where(done_B, pad_id, token_B)
        tokens_BxN = tokens_BxN.at[:, step].set(token_B)
        if eos_id is not None:
            done_B = done_B | (token_B == eos_id)
        positions_Bx1 = (next_positions_B + step)[:, None]
        logits_BxV, state = step_fn(state, token_B[:, None], positions_Bx1)
        return step + 1, state, logits_BxV, tokens_BxN, done_B

    tokens_BxN = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    if done_B is None:
        done_B = jnp.zeros((batch,), jnp.bool_)
    carry = (jnp.zeros((), jnp.int32), state, first_logits_BxV, tokens_BxN, done_B)
    _, _, _, tokens_BxN, done_B = jax.lax.while_loop(cond, body, carry)
    return tokens_BxN, done_B
