"""Schedules against their formulas; the live LR factor inside the optimizer (and its state
tree, the same as optax.adamw's); the weight-decay mask; the fine-tuning recipe."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxlm.config import OptimConfig
from flaxlm.tools.finetune import FinetuneOptions, finetune_optim
from flaxlm.train.optim import decay_mask, make_optimizer, make_schedule


def test_cosine_warmup_then_decay_to_floor():
    cfg = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lr = make_schedule(cfg, total_steps=110, d_model=64)
    assert float(lr(0)) == pytest.approx(0.0)
    assert float(lr(5)) == pytest.approx(0.5e-3)
    assert float(lr(10)) == pytest.approx(1e-3)
    for step in (30, 60, 95):
        progress = (step - 10) / 100
        expected = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * progress))
        assert float(lr(step)) == pytest.approx(expected, rel=1e-5)
    assert float(lr(110)) == pytest.approx(1e-4, rel=1e-5)
    assert float(lr(500)) == pytest.approx(1e-4, rel=1e-5)  # flat at the floor afterwards


def test_linear_decay_and_constant():
    cfg = OptimConfig(lr=2.0, schedule="linear", warmup_steps=4, min_lr_ratio=0.25)
    lr = make_schedule(cfg, total_steps=104, d_model=64)
    assert float(lr(2)) == pytest.approx(1.0)
    assert float(lr(54)) == pytest.approx(2.0 - 0.5 * 1.5)
    assert float(lr(104)) == pytest.approx(0.5)
    const = make_schedule(OptimConfig(lr=2.0, schedule="constant", warmup_steps=4), 100, 64)
    assert [float(const(s)) for s in (2, 4, 50, 99)] == pytest.approx([1.0, 2.0, 2.0, 2.0])


def test_noam_formula():
    cfg = OptimConfig(lr=1.0, schedule="noam", warmup_steps=4000)
    lr = make_schedule(cfg, total_steps=100_000, d_model=512)
    for step in (0, 99, 3999, 4000, 20_000):
        n = step + 1
        expected = 512**-0.5 * min(n**-0.5, n * 4000**-1.5)
        assert float(lr(step)) == pytest.approx(expected, rel=1e-5)


def test_decay_mask_skips_biases_and_norm_scales():
    params = {
        "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
        "ln": {"scale": jnp.ones(3)},
    }
    assert decay_mask(params) == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False}}


def test_adamw_decays_only_masked_params_and_clips():
    cfg = OptimConfig(lr=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5, clip_norm=1.0)
    tx, _ = make_optimizer(cfg, 10, 64)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    state = tx.init(params)
    zero = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    updates, _ = tx.update(zero, state, params)
    # No gradient: only weight decay moves the matrix; the bias stays.
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], 0.0)
    huge = {"w": 1e6 * jnp.ones((2, 2)), "b": 1e6 * jnp.ones(2)}
    updates, _ = tx.update(huge, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


def test_finetune_recipe_warms_up_then_decays_to_zero():
    """``flaxlm finetune`` uses this module's AdamW with BERT's recipe: 10 % linear warmup,
    linear decay to 0 at the last step, beta2 0.999, eps 1e-6, clipping at 1."""
    cfg = finetune_optim(FinetuneOptions(lr=1e-4, warmup_ratio=0.1, weight_decay=0.01), 100)
    assert (cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.clip_norm) == (0.9, 0.999, 1e-6, 0.01, 1)
    lr = make_schedule(cfg, total_steps=100, d_model=64)
    steps = (0, 5, 10, 55, 100, 150)
    assert [float(lr(s)) for s in steps] == pytest.approx([0, 5e-5, 1e-4, 5e-5, 0, 0], abs=1e-10)
    # A run shorter than ten steps still warms up over one step.
    assert finetune_optim(FinetuneOptions(), 3).warmup_steps == 1


def test_the_lr_factor_scales_the_update_and_the_state_stays_optax_adamw():
    """``lr_factor`` multiplies the scheduled LR inside the optimizer; the state tree is
    ``optax.adamw``'s, so checkpoints written before the factor moved in still restore."""
    cfg = OptimConfig(lr=0.1, schedule="cosine", warmup_steps=2, weight_decay=0.5, clip_norm=1.0)
    tx, lr = make_optimizer(cfg, 10, 64)
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(lr.schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.5,
                    mask=decay_mask),
    )  # fmt: skip
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    state, ref_state = tx.init(params), reference.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    grads = {"w": jnp.full((2, 2), 0.3), "b": jnp.full(2, -0.2)}
    for step in range(4):  # factor 1: bit for bit optax's AdamW
        updates, state = tx.update(grads, state, params)
        ref_updates, ref_state = reference.update(grads, ref_state, params)
        assert jax.tree.all(jax.tree.map(jnp.array_equal, updates, ref_updates)), step
    cool = jax.jit(lambda g, s, p, f: tx.update(g, s, p, lr_factor=f))  # f: a traced value
    cooled, _ = cool(grads, state, params, 0.1)
    full, _ = tx.update(grads, state, params)
    for a, b in zip(jax.tree.leaves(cooled), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(a, 0.1 * b, rtol=1e-6)
    assert float(lr(4, 0.1)) == pytest.approx(0.1 * float(lr.schedule(4)))
