"""Tests for flaxlm.models.attention: values and gradients against jax.nn.dot_product_attention
and a plain-NumPy softmax attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models.attention import attention, softmax_attention
from flaxlm.models.masks import Mask

B, L, H, K = 2, 12, 3, 8


def _inputs(dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (B, L, H, K)).astype(dtype) for key in (kq, kk, kv))
    return q, k, v, Mask.causal_segments(SEGMENTS).dense()


SEGMENTS = jnp.array([[1] * (L // 2) + [2] * (L - L // 2), [1] * L])


def _numpy_attention(q, k, v, mask):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("blhk,bshk->bhls", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(mask), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhls,bshk->blhk", probs, v)


def test_softmax_attention_matches_numpy():
    q, k, v, mask = _inputs()
    np.testing.assert_allclose(softmax_attention(q, k, v, mask), _numpy_attention(q, k, v, mask),
                               atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("mask_kind", ["causal_segment", "bidirectional_segment"])
def test_softmax_attention_gradients_match_jax_attention(mask_kind):
    q, k, v, mask = _inputs()
    if mask_kind == "bidirectional_segment":
        mask = Mask.segments(jnp.array([[1] * 5 + [2] * (L - 5), [1] * L])).dense()

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask)))

    def reference(q, k, v, mask):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    ours, theirs = loss(softmax_attention), loss(reference)
    np.testing.assert_allclose(ours(q, k, v), theirs(q, k, v), rtol=1e-5)
    ours_g, theirs_g = jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(theirs, (0, 1, 2))(q, k, v)
    grads = zip(ours_g, theirs_g, strict=True)
    for got, want in grads:
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_bf16_attention_stays_bf16_and_close_to_f32():
    q, k, v, mask = _inputs()
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out16 = softmax_attention(q16, k16, v16, mask)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16.astype(jnp.float32), softmax_attention(q, k, v, mask),
                               atol=0.03)  # fmt: skip

    def loss(q, k, v):
        return jnp.sum(jnp.sin(softmax_attention(q, k, v, mask)).astype(jnp.float32))

    got16, want32 = jax.grad(loss, (0, 1, 2))(q16, k16, v16), jax.grad(loss, (0, 1, 2))(q, k, v)
    for got, want in zip(got16, want32, strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.05)


def test_a_query_with_no_visible_key_gets_the_uniform_average_like_jax():
    q, k, v, _ = _inputs()
    mask = jnp.zeros((B, 1, L, L), jnp.bool_).at[:, :, 1:, :].set(True)  # row 0 sees nothing
    np.testing.assert_allclose(
        softmax_attention(q, k, v, mask),
        jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla"),
        atol=1e-5,
    )


def test_attention_dispatches_on_impl_and_rejects_unknown_ones():
    q, k, v, dense = _inputs()
    mask = Mask.causal_segments(SEGMENTS)
    want = softmax_attention(q, k, v, dense)
    # triton: a shape the GPU flash kernel cannot tile (12 positions), fp32: xla's path
    for impl in ("xla", "flaxlm", "auto", "triton"):
        np.testing.assert_allclose(attention(q, k, v, mask, impl), want, atol=1e-5)
    with pytest.raises(ValueError, match=r"model.attention_impl='flash'.*auto, flaxlm, xla"):
        attention(q, k, v, mask, "flash")


@pytest.mark.parametrize("block", [4, 3, 5], ids=["3_blocks", "4_blocks", "not_dividing"])
def test_causal_blocks_give_the_same_values_and_gradients(block):
    """Skipping the key blocks after each query block changes nothing under a causal mask."""
    q, k, v, mask = _inputs()

    def loss(causal_block):
        return lambda q, k, v: jnp.sum(jnp.sin(softmax_attention(q, k, v, mask, causal_block)))

    np.testing.assert_allclose(loss(block)(q, k, v), loss(0)(q, k, v), rtol=1e-6)
    blocked, whole = (
        jax.grad(loss(block), (0, 1, 2))(q, k, v),
        jax.grad(loss(0), (0, 1, 2))(q, k, v),
    )
    for got, want in zip(blocked, whole, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_gpt_logits_and_gradients_do_not_depend_on_causal_block():
    import dataclasses

    from flaxlm.config import ModelConfig
    from flaxlm.models import GPT

    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=L)
    tokens = jax.random.randint(jax.random.key(2), (B, L), 0, 32)
    segments = jnp.array([[1] * 5 + [2] * (L - 5), [1] * L])
    params = jax.jit(GPT(cfg).init)(jax.random.key(0), tokens)["params"]

    def value_and_grads(causal_block):
        model = GPT(dataclasses.replace(cfg, causal_block=causal_block))

        def loss(p):
            return jnp.sum(jnp.sin(model.apply({"params": p}, tokens, None, segments)))

        return jax.jit(jax.value_and_grad(loss))(params)

    (value_blocked, blocked), (value_whole, whole) = value_and_grads(4), value_and_grads(0)
    np.testing.assert_allclose(value_blocked, value_whole, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(blocked), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", [0, 4], ids=["whole", "causal_blocks"])
def test_the_switch_off_gives_the_same_values_and_gradients(block, dtype):
    """``custom_backward=False`` (model.custom_backward off) differentiates the same forward by
    autodiff: equal outputs, and gradients equal to float32 rounding (fp32) or within bf16's."""
    q, k, v, _ = (x.astype(dtype) if x.dtype != jnp.bool_ else x for x in _inputs())

    def value_and_grads(custom_backward):
        def loss(q, k, v):
            out = attention(
                q, k, v, Mask.causal_segments(SEGMENTS), "flaxlm", block, custom_backward
            )
            return jnp.sum(jnp.sin(out.astype(jnp.float32)))

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)

    (value_on, grads_on), (value_off, grads_off) = value_and_grads(True), value_and_grads(False)
    np.testing.assert_allclose(value_on, value_off, rtol=1e-6)
    tolerance = {"atol": 1e-6} if dtype == jnp.float32 else {"atol": 0.05}
    for on, off in zip(grads_on, grads_off, strict=True):
        assert on.dtype == off.dtype == dtype
        np.testing.assert_allclose(on.astype(jnp.float32), off.astype(jnp.float32), **tolerance)
