"""The fused SwiGLU (flaxlm/models/norm_act.py ``swiglu``): its hand-written backward equals
autodiff of the float32 formula, and a bf16 layer's gradients come back in bf16 (the
property the MoE and dense MLPs rely on to keep no float32 tokens x d_ff buffer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models.norm_act import swiglu


def _reference(gate, up):
    """NumPy in float64: silu(gate) * up."""
    gate, up = np.asarray(gate, np.float64), np.asarray(up, np.float64)
    return gate / (1.0 + np.exp(-gate)) * up


def test_swiglu_values_and_gradients_equal_the_formula_in_float32():
    gate, up, cot = (jax.random.normal(jax.random.key(i), (6, 40)) * 3 for i in range(3))
    np.testing.assert_allclose(swiglu(gate, up), _reference(gate, up), rtol=1e-6, atol=1e-6)

    def loss(fn, g, u):
        return jnp.sum(fn(g, u) * cot)

    plain = lambda g, u: jax.nn.silu(g) * u  # noqa: E731
    got = jax.grad(lambda g, u: loss(swiglu, g, u), (0, 1))(gate, up)
    want = jax.grad(lambda g, u: loss(plain, g, u), (0, 1))(gate, up)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_swiglu_keeps_bf16_and_is_close_to_float32():
    gate, up, cot = (jax.random.normal(jax.random.key(i), (8, 64)) for i in range(3))
    half = [a.astype(jnp.bfloat16) for a in (gate, up, cot)]
    out, vjp = jax.vjp(swiglu, half[0], half[1])
    assert out.dtype == jnp.bfloat16
    grads = vjp(half[2])
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    exact = jax.vjp(lambda g, u: jax.nn.silu(g) * u, *(a.astype(jnp.float32) for a in half[:2]))
    for a, b in zip(grads, exact[1](half[2].astype(jnp.float32)), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2e-2, atol=2e-2)
