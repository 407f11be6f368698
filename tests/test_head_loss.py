"""Tests for flaxlm.losses.head_loss: the chunked head + loss equals the plain logits path, in
value,
metrics and gradients (tied and untied head, label smoothing, z-loss, masked positions)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxlm.config import Config, ModelConfig
from flaxlm.losses.head_loss import chunk_size, fused_lm_loss
from flaxlm.losses.objectives import token_losses

B, L, D, V = 2, 12, 16, 40


def _inputs(dtype=jnp.float32, tied=True):
    kh, kw, kt, km = jax.random.split(jax.random.key(3), 4)
    hidden = jax.random.normal(kh, (B, L, D)).astype(dtype)
    head = jax.random.normal(kw, (V, D) if tied else (D, V)) * 0.3
    targets = jax.random.randint(kt, (B, L), 0, V)
    mask = (jax.random.uniform(km, (B, L)) > 0.25).astype(jnp.float32)
    return hidden, head, targets, mask


def _plain(hidden, head, targets, mask, tied, smoothing, z_loss):
    h32 = hidden.astype(jnp.float32)
    w32 = head.astype(hidden.dtype).astype(jnp.float32)
    logits = jnp.einsum("bld,vd->blv" if tied else "bld,dv->blv", h32, w32)
    ce, objective, correct = token_losses(logits, targets, smoothing, z_loss)
    return jnp.sum(objective * mask), ce, correct


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-3)], ids=["ce", "smooth_z"])
@pytest.mark.parametrize("chunk", [4, 5, 12], ids=["chunk4", "chunk5->4", "one_chunk"])
def test_fused_loss_metrics_and_gradients_equal_the_plain_path(tied, smoothing, z_loss, chunk):
    hidden, head, targets, mask = _inputs(tied=tied)

    def fused(h, w):
        return fused_lm_loss(h, w, targets, mask, head_is_embedding=tied, chunk=chunk,
                             label_smoothing=smoothing, z_loss=z_loss)  # fmt: skip

    def plain(h, w):
        return _plain(h, w, targets, mask, tied, smoothing, z_loss)

    for got, want in zip(fused(hidden, head), plain(hidden, head), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda h, w: fused(h, w)[0], (0, 1))(hidden, head)
    want_grads = jax.grad(lambda h, w: plain(h, w)[0], (0, 1))(hidden, head)
    for got, want in zip(grads, want_grads, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the incoming cotangent scales both gradients (the train step divides by the token count)
    scaled = jax.grad(lambda h, w: 0.25 * fused(h, w)[0], (0, 1))(hidden, head)
    for got, want in zip(scaled, want_grads, strict=True):
        np.testing.assert_allclose(got, 0.25 * want, rtol=1e-4, atol=1e-6)


def test_bf16_hidden_states_get_bf16_gradients_close_to_f32():
    hidden, head, targets, mask = _inputs()

    def loss(h):
        return fused_lm_loss(h, head, targets, mask, head_is_embedding=True, chunk=4)[0]

    got = jax.grad(loss)(hidden.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), jax.grad(loss)(hidden), atol=0.02)


def test_chunk_size_is_the_largest_divisor_not_above_the_request():
    assert [chunk_size(12, c) for c in (1, 4, 5, 7, 12, 64)] == [1, 4, 4, 6, 12, 12]
    assert chunk_size(13, 8) == 1


def test_train_step_loss_and_gradients_do_not_depend_on_head_chunk():
    from flaxlm.families import GPT_FAMILY

    base = Config()
    model_cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=2, d_ff=32,
                            max_seq_len=L, tie_embeddings=False)  # fmt: skip
    cfg = dataclasses.replace(base, model=model_cfg)
    cfg.data.seq_len, cfg.train.batch_size, cfg.train.label_smoothing = L, B, 0.1
    synthetic = GPT_FAMILY.synthetic_batch(cfg, np.random.default_rng(0))
    batch = {k: jnp.asarray(v) for k, v in synthetic.items()}
    batch["loss_mask"] = batch["loss_mask"].at[:, :3].set(0.0)
    model = GPT_FAMILY.build_model(model_cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), batch["inputs"])["params"])

    def run(chunk):
        cfg.train.head_chunk = chunk
        grad_fn = jax.value_and_grad(GPT_FAMILY.loss, has_aux=True)
        scale = GPT_FAMILY.loss_scales(cfg, batch)
        return grad_fn(params, batch, model, cfg, scale, jax.random.key(1), True)

    (obj0, metrics0), grads0 = run(0)
    (obj4, metrics4), grads4 = run(4)
    np.testing.assert_allclose(obj4, obj0, rtol=1e-5)
    for key in ("ce_sum", "correct", "n_tokens"):
        np.testing.assert_allclose(metrics4[key], metrics0[key], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads4), jax.tree.leaves(grads0), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_switch_off_gives_the_same_loss_metrics_and_gradients(tied, dtype):
    """``custom_backward=False`` (model.custom_backward off): autodiff of the same chunked
    scan, each chunk rematerialised; the metrics and the loss weights carry no gradient."""
    hidden, head, targets, mask = _inputs(dtype, tied)

    def run(custom_backward):
        def loss(h, w, m):
            objective, ce, correct = fused_lm_loss(
                h, w, targets, m, head_is_embedding=tied, chunk=4, label_smoothing=0.1,
                z_loss=1e-3, custom_backward=custom_backward,
            )  # fmt: skip
            return objective + jnp.sum(ce) + jnp.sum(correct), (objective, ce, correct)

        return jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(hidden, head, mask)

    (grads_on, outs_on), (grads_off, outs_off) = run(True), run(False)
    for on, off in zip(outs_on, outs_off, strict=True):
        np.testing.assert_allclose(on, off, rtol=1e-6)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == jnp.float32 else {"atol": 0.02}
    for on, off in zip(grads_on[:2], grads_off[:2], strict=True):
        assert on.dtype == off.dtype
        np.testing.assert_allclose(on.astype(jnp.float32), off.astype(jnp.float32), **tolerance)
    assert not np.any(grads_on[2]) and not np.any(grads_off[2])  # no gradient to the weights

    # and the off path still keeps no chunk's logits for the backward pass: it recomputes them
    def objective(h, custom_backward):
        return fused_lm_loss(h, head, targets, mask, head_is_embedding=tied, chunk=4,
                             custom_backward=custom_backward)[0]  # fmt: skip

    def backward_jaxpr(custom_backward):
        return str(jax.make_jaxpr(jax.grad(lambda h: objective(h, custom_backward)))(hidden))

    assert "remat" in backward_jaxpr(False) and "remat" not in backward_jaxpr(True)
