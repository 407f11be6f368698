"""Tests for flaxlm.models.norm_act (LayerNorm, tanh GELU) and flaxlm.models.backward (the one
``model.custom_backward`` switch): the closed-form backward passes against ``jax.grad`` of
plain jnp formulas written here, and a whole model with the switch on against it off."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.config import Config, ModelConfig, load_config
from flaxlm.families import build_model
from flaxlm.models.backward import use_custom_backward
from flaxlm.models.norm_act import activation_fn, gelu_tanh, layer_norm

N, D = 6, 24


def _reference_layer_norm(x, scale, bias, eps):
    """LayerNorm as a textbook formula (mean, biased variance), in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def _reference_gelu(x):
    """GELU, tanh approximation (Hendrycks & Gimpel), in float32."""
    x = x.astype(jnp.float32)
    return 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _ln_inputs(dtype=jnp.float32):
    kx, ks, kb, kg = jax.random.split(jax.random.key(4), 4)
    x = (3.0 + 2.0 * jax.random.normal(kx, (2, N, D))).astype(dtype)  # offset: mean matters
    scale = 1.0 + 0.3 * jax.random.normal(ks, (D,))
    bias = 0.3 * jax.random.normal(kb, (D,))
    return x, scale, bias, jax.random.normal(kg, (2, N, D))


@pytest.mark.parametrize("custom_backward", [True, False], ids=["closed_form", "autodiff"])
def test_layer_norm_values_and_gradients_equal_autodiff_of_the_formula(custom_backward):
    x, scale, bias, g = _ln_inputs()

    def ours(x, scale, bias):
        return jnp.sum(g * layer_norm(x, scale, bias, 1e-5, custom_backward))

    def reference(x, scale, bias):
        return jnp.sum(g * _reference_layer_norm(x, scale, bias, 1e-5))

    np.testing.assert_allclose(ours(x, scale, bias), reference(x, scale, bias), rtol=1e-6)
    got = jax.grad(ours, (0, 1, 2))(x, scale, bias)
    want = jax.grad(reference, (0, 1, 2))(x, scale, bias)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == jnp.float32 and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # d/dx of a LayerNorm sums to zero over the normalised axis (shifting x changes nothing)
    np.testing.assert_allclose(got[0].sum(-1), 0.0, atol=1e-5)


def test_bf16_layer_norm_gives_bf16_input_gradients_close_to_f32():
    x, scale, bias, g = _ln_inputs()

    def loss(x):
        return jnp.sum(g * layer_norm(x, scale, bias, 1e-5, custom_backward=True))

    got = jax.grad(loss)(x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    want = jax.grad(lambda x: jnp.sum(g * _reference_layer_norm(x, scale, bias, 1e-5)))(x)
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.05)


@pytest.mark.parametrize("custom_backward", [True, False], ids=["closed_form", "autodiff"])
def test_gelu_tanh_values_and_gradients_equal_autodiff_of_the_formula(custom_backward):
    x = jnp.linspace(-6.0, 6.0, 241)  # both tails and the bend around 0
    np.testing.assert_allclose(gelu_tanh(x, custom_backward), _reference_gelu(x), atol=1e-6)
    np.testing.assert_allclose(
        gelu_tanh(x, custom_backward), jax.nn.gelu(x, approximate=True), atol=1e-6
    )
    got = jax.grad(lambda x: jnp.sum(jnp.cos(x) * gelu_tanh(x, custom_backward)))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.cos(x) * _reference_gelu(x)))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_gelu_gives_bf16_gradients_close_to_f32():
    x = jnp.linspace(-4.0, 4.0, 81)
    got = jax.grad(lambda x: jnp.sum(gelu_tanh(x, custom_backward=True)))(x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    want = jax.grad(lambda x: jnp.sum(_reference_gelu(x)))(x)
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.02)


def test_activation_fn_passes_the_switch_and_rejects_unknown_names():
    x = jnp.linspace(-3.0, 3.0, 13)
    want = jax.grad(lambda x: _reference_gelu(x).sum())(x)
    for custom_backward in (True, False):
        gelu = activation_fn("gelu", custom_backward)
        got = jax.grad(lambda x, gelu=gelu: gelu(x).sum())(x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"activation 'swish' is not one of gelu, gelu_exact"):
        activation_fn("swish")


# --- the switch -----------------------------------------------------------------------------


def test_custom_backward_is_on_for_auto_only_on_the_cpu(monkeypatch):
    assert jax.default_backend() == "cpu"  # the test suite runs on the CPU
    assert use_custom_backward("auto") and use_custom_backward(Config())
    assert use_custom_backward(ModelConfig(custom_backward="on"))
    assert not use_custom_backward(ModelConfig(custom_backward="off"))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not use_custom_backward(ModelConfig())  # auto elsewhere = plain autodiff
    assert use_custom_backward("on")
    with pytest.raises(ValueError, match=r"model.custom_backward='yes' is not one of auto, on"):
        use_custom_backward("yes")


def test_config_rejects_a_bad_custom_backward():
    from flaxlm.config import ConfigError

    with pytest.raises(ConfigError, match="custom_backward"):
        load_config(None, ["model.custom_backward=fast"], check_paths=False)


def _forward_jaxpr(cfg: ModelConfig, tokens) -> str:
    """The traced (never run) forward pass: ``init`` runs the model once."""
    return str(jax.make_jaxpr(build_model(cfg).init)(jax.random.key(0), tokens))


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_off_leaves_no_hand_written_backward_in_the_model(family, monkeypatch):
    cfg = ModelConfig(family=family, vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                      max_seq_len=8, activation="gelu")  # fmt: skip
    tokens = jnp.zeros((1, 8), jnp.int32)
    assert "custom_vjp" in _forward_jaxpr(cfg, tokens)  # auto on the CPU
    assert "custom_vjp" not in _forward_jaxpr(dataclasses.replace(cfg, custom_backward="off"),
                                              tokens)  # fmt: skip
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert "custom_vjp" not in _forward_jaxpr(cfg, tokens)  # auto off the CPU


def test_a_gpt_with_the_switch_off_has_the_same_logits_and_gradients():
    """All four model-side backward passes at once: matmuls (dense layers and the tied head),
    blocked causal attention, LayerNorm, GELU (bf16: per op, in each op's test file)."""
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=12,
                      causal_block=4)  # fmt: skip
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 32)
    segments = jnp.array([[1] * 5 + [2] * 7, [1] * 12])
    params = jax.jit(build_model(cfg).init)(jax.random.key(0), tokens)["params"]

    def loss_and_grads(mode):
        model = build_model(dataclasses.replace(cfg, custom_backward=mode))

        def loss(p):
            return jnp.sum(jnp.sin(model.apply({"params": p}, tokens, None, segments)))

        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_on, on), (loss_off, off) = loss_and_grads("on"), loss_and_grads("off")
    np.testing.assert_allclose(loss_on, loss_off, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(on), jax.tree.leaves(off), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
