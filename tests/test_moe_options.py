"""Modern MoE options (flaxlm/models/moe.py, flaxlm/train/moe_terms.py) against a NumPy
per-token loop: shared experts, fine-grained expert width (``d_expert``), and DeepSeek-V3's
sigmoid router whose bias is balanced by the train step instead of an auxiliary loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxlm.config import ModelConfig, MoEConfig, load_config
from flaxlm.models.moe import MoEMLP, collect
from flaxlm.train import moe_terms

D, F, E = 16, 24, 6


def _silu(v):
    return v / (1 + np.exp(-v))


def _numpy_moe(x, p, top_k: int, router: str, shared: bool):
    """Per token: the router's top-k (sigmoid: chosen on score + bias, weighted by the scores,
    renormalised), SwiGLU experts, plus the shared MLP on every token."""
    x = np.asarray(x, np.float64).reshape(-1, D)
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), p)
    logits = x @ p["router"]
    if router == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
        choice = np.argsort(-(scores + p["router_bias"]), axis=-1, kind="stable")[:, :top_k]
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        choice = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(scores, choice, -1)
    weights /= weights.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    for t in range(len(x)):
        for k in range(top_k):
            e = choice[t, k]
            h = _silu(x[t] @ p["gate"][e]) * (x[t] @ p["up"][e])
            y[t] += weights[t, k] * (h @ p["down"][e])
        if shared:
            h = _silu(x[t] @ p["shared_gate"]) * (x[t] @ p["shared_up"])
            y[t] += h @ p["shared_down"]
    return y


def _run(router="softmax", shared=0, d_expert=0, top_k=2, bias=None):
    moe = MoEConfig(num_experts=E, top_k=top_k, router=router, shared_experts=shared,
                    d_expert=d_expert)  # fmt: skip
    layer = MoEMLP(ModelConfig(d_model=D, d_ff=F, n_layers=2, activation="swiglu", moe=moe))
    x = jax.random.normal(jax.random.key(0), (2, 8, D))
    params = nn.meta.unbox(layer.init(jax.random.key(1), x))["params"]
    params = jax.tree.map(lambda v: v * 3.0, params)
    if bias is not None:
        params["router_bias"] = jnp.asarray(bias, jnp.float32)
    y, state = layer.apply({"params": params}, x, mutable=["moe"])
    return x, params, y, collect(state)


def test_fine_grained_experts_with_shared_experts_match_the_loop():
    x, params, y, _ = _run(shared=2, d_expert=8, top_k=3)
    assert params["up"].shape == (E, D, 8) and params["shared_up"].shape == (D, 16)
    want = _numpy_moe(x, params, 3, "softmax", shared=True)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, atol=1e-4, rtol=1e-5)


def test_sigmoid_router_chooses_with_its_bias_and_weights_by_scores():
    bias = [0.0, 5.0, 0.0, -5.0, 0.0, 0.0]  # expert 1 always chosen, expert 3 never
    x, params, y, stats = _run(router="sigmoid", bias=bias)
    want = _numpy_moe(x, params, 2, "sigmoid", shared=False)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, atol=1e-4, rtol=1e-5)
    assert float(stats["expert_tokens"][1]) == 16 and float(stats["expert_tokens"][3]) == 0


def test_the_bias_gets_no_gradient():
    x, params, _, _ = _run(router="sigmoid")
    layer = MoEMLP(ModelConfig(d_model=D, d_ff=F, n_layers=2, activation="swiglu",
                               moe=MoEConfig(num_experts=E, router="sigmoid")))  # fmt: skip
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, mutable=["moe"])[0])))(
        params
    )
    assert float(jnp.abs(grads["router_bias"]).sum()) == 0
    assert float(jnp.abs(grads["router"]).sum()) > 0


class _State:
    def __init__(self, params):
        self.params = params

    def replace(self, params):
        return _State(params)


def test_bias_update_moves_under_and_overloaded_experts():
    """bias' = bias before the step + rate * sign(mean load - load), per layer, whatever the
    optimizer did to it; the other parameters keep their update."""
    cfg = load_config(None, ["model.moe.num_experts=4", "model.moe.router=sigmoid",
                             "model.moe.bias_update_rate=0.01", "model.n_layers=2"])  # fmt: skip
    bias = np.array([[0.0, 0.1, 0.0, 0.0], [0.0] * 4], np.float32)
    old = {"blocks": {"mlp": {"router_bias": bias, "up": np.zeros(3)}}}
    new = {"blocks": {"mlp": {"router_bias": np.ones((2, 4)), "up": np.ones(3)}}}
    loads = np.array([[5.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
    out = moe_terms.update_router_bias(old, _State(new), {"moe_layer_tokens": loads}, cfg).params
    want = old["blocks"]["mlp"]["router_bias"] + 0.01 * np.sign(
        loads.mean(-1, keepdims=True) - loads
    )
    np.testing.assert_allclose(out["blocks"]["mlp"]["router_bias"], want)
    np.testing.assert_array_equal(out["blocks"]["mlp"]["up"], np.ones(3))


@pytest.mark.parametrize("override,message", [
    ("model.moe.router=topk", "model.moe.router='topk' is not one of softmax, sigmoid"),
    ("model.moe.d_expert=-1", "model.moe.d_expert=-1 must be >= 0"),
    ("model.moe.shared_experts=-2", "model.moe.shared_experts=-2 must be >= 0"),
    ("mesh.expert=3", "model.moe.num_experts=4 must be a multiple of mesh.expert=3"),
])  # fmt: skip
def test_bad_option_values_are_one_line_errors(override, message):
    from flaxlm.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.moe.num_experts=4", override])
