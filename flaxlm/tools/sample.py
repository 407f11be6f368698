"""``flaxlm sample``: greedy or temperature sampling from a checkpoint.

Each new token re-runs the model over a fixed-size window (``seq_len``), so one compiled
function serves every step and prompt length; a KV cache is the faster path for long outputs.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.tools.load import LoadedModel


@partial(jax.jit, static_argnames=("model", "greedy"))
def _next_token(model, params, window_1xL, last_index, rng, temperature, greedy: bool):
    logits_1xLxV = model.apply({"params": params}, window_1xL)
    logits_V = logits_1xLxV[0, last_index]
    if greedy:
        return jnp.argmax(logits_V).astype(jnp.int32)
    return jax.random.categorical(rng, logits_V / temperature).astype(jnp.int32)


def generate_ids(
    loaded: LoadedModel,
    prompt_ids: list[int],
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[int]:
    """Continues ``prompt_ids``; ``temperature=0`` is greedy. Returns only the new ids."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    length = loaded.cfg.data.seq_len
    tokens = list(prompt_ids) or [loaded.tokenizer.eos_id]
    rng = jax.random.key(seed)
    out: list[int] = []
    for i in range(max_new_tokens):
        window = tokens[-length:]
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(window)] = window
        token = int(
            _next_token(
                loaded.model,
                loaded.params,
                jnp.asarray(padded),
                len(window) - 1,
                jax.random.fold_in(rng, i),
                max(temperature, 1e-6),
                temperature == 0,
            )
        )
        if stop_at_eos and token == loaded.tokenizer.eos_id:
            break
        tokens.append(token)
        out.append(token)
    return out


def generate(
    loaded: LoadedModel,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """The prompt's continuation as text."""
    ids = loaded.tokenizer.encode(prompt)
    return loaded.tokenizer.decode(generate_ids(loaded, ids, max_new_tokens, temperature, seed))
