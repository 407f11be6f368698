"""Tests for flaxlm.models.matmul: the hand-written backward equals autodiff of the product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models.matmul import matmul


def _operands(dtype, rhs_transposed: bool, batch: tuple[int, ...] = ()):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (*batch, 12, 16)).astype(dtype)
    w_shape = (20, 16) if rhs_transposed else (16, 20)
    w = jax.random.normal(kw, (*batch, *w_shape)).astype(dtype)
    return x, w, jax.random.normal(kg, (*batch, 12, 20))


def _reference(x, w, rhs_transposed):
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    return x @ (jnp.swapaxes(w, -1, -2) if rhs_transposed else w)


@pytest.mark.parametrize("batch", [(), (3,)], ids=["2d", "batched"])
@pytest.mark.parametrize("rhs_transposed", [False, True])
def test_fp32_matmul_and_gradients_equal_autodiff(rhs_transposed, batch):
    """Both operand layouts (Dense, the tied head) and G independent products (3-D)."""
    x, w, g = _operands(jnp.float32, rhs_transposed, batch)

    def ours(x, w):
        return jnp.sum(g * matmul(x, w, rhs_transposed))

    def reference(x, w):
        return jnp.sum(g * _reference(x, w, rhs_transposed))

    np.testing.assert_allclose(ours(x, w), reference(x, w), rtol=1e-6)
    ours_g, reference_g = jax.grad(ours, (0, 1))(x, w), jax.grad(reference, (0, 1))(x, w)
    for got, want in zip(ours_g, reference_g, strict=True):
        assert got.dtype == jnp.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rhs_transposed", [False, True])
def test_bf16_matmul_gradients_are_bf16_and_match_f32_autodiff(rhs_transposed):
    """bf16 cotangent, f32 accumulation: bf16-precision agreement with the f32 product."""
    x, w, g = _operands(jnp.bfloat16, rhs_transposed)
    out = matmul(x, w, rhs_transposed)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _reference(x, w, rhs_transposed), rtol=1e-5)

    def ours(x, w):
        return jnp.sum(g * matmul(x, w, rhs_transposed))

    def reference(x, w):
        return jnp.sum(g * _reference(x, w, rhs_transposed))

    ours_g, reference_g = jax.grad(ours, (0, 1))(x, w), jax.grad(reference, (0, 1))(x, w)
    for got, want in zip(ours_g, reference_g, strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rhs_transposed", [False, True])
def test_the_switch_off_gives_the_same_product_and_gradients(rhs_transposed, dtype):
    """``custom_backward=False`` is plain autodiff of the same product (model.custom_backward
    off): the same values, the same gradient dtypes, gradients equal to float32 rounding (fp32)
    or to a few bf16 ulps (bf16: the hand-written backward rounds the cotangent first)."""
    x, w, g = _operands(dtype, rhs_transposed, (3,))

    def loss(custom_backward):
        return jax.jit(
            jax.value_and_grad(
                lambda x, w: jnp.sum(g * matmul(x, w, rhs_transposed, custom_backward)), (0, 1)
            )
        )

    (value_on, grads_on), (value_off, grads_off) = loss(True)(x, w), loss(False)(x, w)
    np.testing.assert_allclose(value_on, value_off, rtol=1e-6)
    tolerance = {"rtol": 1e-6, "atol": 1e-5} if dtype == jnp.float32 else {"atol": 0.1}
    for on, off in zip(grads_on, grads_off, strict=True):
        assert on.dtype == off.dtype == dtype
        np.testing.assert_allclose(on.astype(jnp.float32), off.astype(jnp.float32), **tolerance)
