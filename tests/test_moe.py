"""Mixture-of-Experts (flaxlm/models/moe.py, flaxlm/train/moe_terms.py): the layer against a
plain-NumPy per-token loop (dropless and with a capacity limit), the auxiliary losses, the
config checks, and MoE runs through training, evaluation and generation."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import linen as nn

from flaxlm.config import ConfigError, ModelConfig, MoEConfig, load_config
from flaxlm.models import GPT
from flaxlm.models.moe import MoEMLP, collect

D, F, E = 16, 24, 4


def _cfg(**moe) -> ModelConfig:
    return ModelConfig(d_model=D, d_ff=F, n_layers=2, activation="swiglu",
                       moe=MoEConfig(num_experts=E, **moe))  # fmt: skip


def _layer(cfg: ModelConfig, tokens: int = 10):
    x = jax.random.normal(jax.random.key(0), (2, tokens // 2, D))
    layer = MoEMLP(cfg)
    params = nn.meta.unbox(layer.init(jax.random.key(1), x))["params"]
    params = jax.tree.map(lambda p: p * 3.0, params)  # a router far from uniform
    y, state = layer.apply({"params": params}, x, mutable=["moe"])
    return x, params, y, collect(state)


def _numpy_moe(x_BxLxD, params, top_k: int, capacity: int | None = None):
    """Per token: softmax router, top-k renormalised, SwiGLU experts; with ``capacity``, an
    expert takes first choices before second ones, each in token order, up to capacity."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x_BxLxD, np.float64).reshape(-1, D)
    logits = x @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    choice = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, choice, -1)
    weights /= weights.sum(-1, keepdims=True)
    taken = np.zeros(E, int)
    kept = np.zeros(choice.shape, bool)
    for k in range(top_k):
        for t in range(len(x)):
            e = choice[t, k]
            if capacity is None or taken[e] < capacity:
                taken[e] += 1
                kept[t, k] = True
    y = np.zeros_like(x)
    for t in range(len(x)):
        for k in range(top_k):
            if kept[t, k]:
                e = choice[t, k]
                gate, up = x[t] @ p["gate"][e], x[t] @ p["up"][e]
                h = gate / (1 + np.exp(-gate)) * up
                y[t] += weights[t, k] * (h @ p["down"][e])
    return y.reshape(x_BxLxD.shape), int((~kept).sum())


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_moe_matches_a_per_token_loop(top_k):
    x, params, y, stats = _layer(_cfg(top_k=top_k))
    want, dropped = _numpy_moe(x, params, top_k)
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert float(stats["dropped"]) == dropped == 0
    assert float(stats["expert_tokens"].sum()) == 10 * top_k


@pytest.mark.parametrize("factor", [0.5, 1.0, 4.0])
def test_capacity_routing_drops_what_the_loop_drops(factor):
    x, params, y, stats = _layer(_cfg(top_k=2, capacity_factor=factor))
    capacity = max(1, math.ceil(factor * 10 * 2 / E))
    want, dropped = _numpy_moe(x, params, 2, capacity)
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert float(stats["dropped"]) == dropped
    if factor == 4.0:  # room for everyone: the same as dropless
        assert dropped == 0


def test_auxiliary_losses_are_the_formulas():
    cfg = _cfg(top_k=2, load_balance_loss=1.0, router_z_loss=0.0)
    x, params, _, stats = _layer(cfg)
    logits = np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(params["router"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    choice = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
    share = np.bincount(choice.ravel(), minlength=E) / choice.size
    np.testing.assert_allclose(stats["aux_loss"], E * np.sum(share * probs.mean(0)), rtol=1e-5)
    z_only = _layer(_cfg(top_k=2, load_balance_loss=0.0, router_z_loss=1.0))[3]["aux_loss"]
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(z_only, np.mean(lse**2), rtol=1e-5)


def test_moe_every_other_block_and_gradients_reach_every_expert():
    cfg = _cfg(top_k=2, every=2)
    cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": 32, "n_heads": 2, "max_seq_len": 16})
    model = GPT(cfg)
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
    assert "router" not in params["blocks_0"]["mlp"] and "router" in params["blocks_1"]["mlp"]

    def loss(p):
        out, state = model.apply({"params": p}, tokens, mutable=["moe"])
        return jnp.mean(out**2) + collect(state)["aux_loss"]

    grads = jax.jit(jax.grad(loss))(params)["blocks_1"]["mlp"]  # jit: faster than eager here
    assert float(jnp.abs(grads["router"]).sum()) > 0
    per_expert = jnp.abs(grads["up"]).sum(axis=(1, 2))
    assert bool(jnp.all(per_expert > 0)), per_expert  # 32 tokens x 2: every expert is used


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.moe.top_k=5", "model.moe.top_k=5 must be between 1 and model.moe.num_experts=4"),
        ("model.moe.capacity_factor=-1", "model.moe.capacity_factor=-1.0 must be >= 0"),
        ("model.moe.every=0", "model.moe.every=0 must be >= 1"),
        ("model.moe.every=2", "model.moe.every=2 needs model.scan_layers=false"),
    ],
)
def test_bad_moe_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.moe.num_experts=4", "model.scan_layers=true", override])


def test_an_moe_run_trains_logs_its_routing_evaluates_and_generates(
    small_corpus, tiny_cache_dir, tmp_path
):
    from flaxlm.tools.generate import generate
    from flaxlm.tools.load import load_checkpoint
    from flaxlm.train import train

    cfg = tiny_config(
        small_corpus, tiny_cache_dir, tmp_path / "run", "model.moe.num_experts=4",
        "model.moe.top_k=2", "model.moe.capacity_factor=1.0", "train.steps=6",
        "train.eval_every=3", "checkpoint.every=3",
    )  # fmt: skip
    result = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert len(steps) == 6
    for r in steps:
        assert len(r["moe_load"]) == 4 and math.isclose(sum(r["moe_load"]), 1.0, rel_tol=1e-5)
        assert r["moe_load_min"] <= 0.25 <= r["moe_load_max"]
        assert 0 <= r["moe_dropped"] < 1 and 0 < r["moe_aux_loss"] < 1
    assert math.isfinite(result.evals[-1]["val_loss"])
    loaded = load_checkpoint(tmp_path / "run")
    greedy = generate(loaded, "HAMLET.", max_new_tokens=5, temperature=0.0)
    beams = generate(loaded, "HAMLET.", max_new_tokens=5, num_beams=2)
    assert isinstance(greedy, str) and isinstance(beams, str)


def test_an_moe_run_rolls_back_and_resumes_exactly(
    small_corpus, tiny_cache_dir, tmp_path, monkeypatch
):
    """Rollback and exact resume need nothing MoE-specific: a spike is rolled back, and a run
    killed after it, then resumed, ends bit-identical to the straight one (routing included,
    with the sigmoid router's bias, which the step moves outside the gradient)."""
    from test_exact_resume import Killed, kill_once, metrics

    from flaxlm.tools.load import load_checkpoint
    from flaxlm.train.chaos import train_with_chaos as train  # chaos.* faults: the harness
    from flaxlm.train.reporter import StepReporter

    run = ("model.moe.num_experts=4", "model.moe.router=sigmoid", "train.steps=10",
           "train.eval_every=10", "checkpoint.every=3", "checkpoint.asynchronous=false",
           "guard.warmup=3", "guard.known_good_after=2", "chaos.spike_at_steps=[6]")  # fmt: skip
    straight = train(tiny_config(small_corpus, tiny_cache_dir, tmp_path / "straight", *run))
    assert len(straight.rollbacks) == 1
    cfg = tiny_config(small_corpus, tiny_cache_dir, tmp_path / "killed", *run)
    kill_once(monkeypatch, StepReporter, "step_done", lambda step, *rest: step == 8)
    with pytest.raises(Killed):
        train(cfg)
    train(cfg)
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "straight")
    a, b = load_checkpoint(tmp_path / "killed"), load_checkpoint(tmp_path / "straight")
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    flat = jax.tree_util.tree_flatten_with_path(a.params)[0]
    bias = np.concatenate([np.ravel(v) for p, v in flat if "router_bias" in str(p[-1])])
    assert len(bias) == 2 * 4  # moved by +-1e-3 per step
    assert np.abs(bias).max() > 0 and np.allclose(bias / 1e-3, np.round(bias / 1e-3), atol=1e-3)
