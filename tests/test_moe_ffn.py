"""The experts' grouped FFN (flaxlm/models/moe_ffn.py): run in row chunks it gives a NumPy
per-row loop's outputs and the unchunked FFN's gradients, with groups that straddle chunks,
an empty group and padding rows that belong to no group."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models import moe_ffn
from flaxlm.models.moe_ffn import grouped_ffn

R, D, F = 24, 8, 12
SIZES = (7, 0, 9, 3)  # 19 rows in groups, the last 5 are padding


def _inputs():
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (R, D))
    up, gate = (jax.random.normal(k, (len(SIZES), D, F)) / D**0.5 for k in keys[1:3])
    down = jax.random.normal(keys[3], (len(SIZES), F, D)) / F**0.5
    return x, jnp.asarray(SIZES, jnp.int32), up, gate, down


def _numpy_ffn(x, up, gate, down, activation: str):
    """Each row through its group's MLP; rows past the groups give 0."""
    x, up, gate, down = (np.asarray(a, np.float64) for a in (x, up, gate, down))
    group = np.repeat(np.arange(len(SIZES)), SIZES)
    y = np.zeros_like(x)
    for r, g in enumerate(group):
        h = x[r] @ up[g]
        if activation == "swiglu":
            a = x[r] @ gate[g]
            h = a / (1 + np.exp(-a)) * h
        else:
            h = np.maximum(h, 0.0)
        y[r] = h @ down[g]
    return y


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_row_chunks_equal_numpy_and_unchunked_gradients(activation):
    x, sizes, up, gate, down = _inputs()
    gate = gate if activation == "swiglu" else None

    def loss(chunk_rows, x, up, gate, down):
        y = grouped_ffn(x, sizes, up, gate, down, activation=activation, dtype=jnp.float32,
                        chunk_rows=chunk_rows)  # fmt: skip
        return jnp.sum(jnp.sin(y)), y

    grads = jax.grad(loss, argnums=(1, 2, 3, 4), has_aux=True)
    # one program: unchunked, then chunks of 4 and 8 rows (groups 0 and 2 straddle chunks)
    runs = jax.jit(lambda *a: [grads(c, *a) for c in (R, 4, 8)])(x, up, gate, down)
    (whole, _), chunked = runs[0], runs[1:]
    want = _numpy_ffn(x, up, gate if gate is not None else up, down, activation)
    for got, y in chunked:
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y[sum(SIZES) :], 0.0)
        for g_chunked, g_whole in zip(got, whole, strict=True):
            if g_whole is not None:
                np.testing.assert_allclose(g_chunked, g_whole, rtol=1e-5, atol=1e-6)


def test_chunk_choice_and_bad_chunk():
    rows, row_bytes = 32768, 14336 * 2  # Mixtral's worst-case receive buffer, bf16
    chunk = moe_ffn._chunk_rows(rows, row_bytes)
    assert rows % chunk == 0 and chunk * row_bytes <= moe_ffn.CHUNK_BYTES < 2 * chunk * row_bytes
    assert moe_ffn._chunk_rows(64, 4) == 64  # small buffers run unchunked
    x, sizes, up, gate, down = _inputs()
    with pytest.raises(ValueError, match="chunk_rows=5 must be a positive divisor of the 24"):
        grouped_ffn(x, sizes, up, gate, down, activation="swiglu", dtype=jnp.float32,
                    chunk_rows=5)  # fmt: skip
