"""The learning rate is decided in one place (flaxlm/train/optim.py, ``LearningRate``): the
schedule times the live factor (the cool-down after a rollback), applied by the optimizer's
own update. The ``lr`` a step logs is the rate its update applied, recovered here from the
parameters and Adam's moments; a new factor does not recompile the step."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from conftest import REPO

from flaxlm.config import load_config
from flaxlm.families import family_of
from flaxlm.train.batches import put_train_batch
from flaxlm.train.program import TrainProgram
from flaxlm.train.step import step_controls


def applied_lr(before, after, cfg) -> float:
    """The LR an AdamW update applied, from one step's parameters and moments: a bias or norm
    scale (no weight decay) moves by ``-lr * m_hat / (sqrt(v_hat) + eps)``."""
    (adam,) = [
        s
        for s in jax.tree.leaves(
            after.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState)
        )
        if isinstance(s, optax.ScaleByAdamState)
    ]
    t = int(adam.count)
    ratios = []
    flat = zip(
        jax.tree.leaves(before.params),
        jax.tree.leaves(after.params),
        jax.tree.leaves(adam.mu),
        jax.tree.leaves(adam.nu),
        strict=True,
    )
    for p0, p1, mu, nu in flat:
        if p0.ndim != 1:  # matrices also decay: leave them out
            continue
        mu, nu = np.asarray(mu, np.float64), np.asarray(nu, np.float64)
        m_hat, v_hat = mu / (1 - cfg.optim.b1**t), nu / (1 - cfg.optim.b2**t)
        direction = m_hat / (np.sqrt(v_hat) + cfg.optim.eps)
        moved = np.asarray(p1, np.float64) - np.asarray(p0, np.float64)
        big = np.abs(direction) > 0.5
        ratios.append(-moved[big] / direction[big])
    return float(np.median(np.concatenate(ratios)))


def test_the_logged_lr_is_the_rate_the_optimizer_applied():
    cfg = load_config(
        REPO / "configs/gpt_tiny.yaml", ["optim.lr=1e-2", "optim.warmup_steps=3"], check_paths=False
    )
    family = family_of(cfg)
    ms = TrainProgram.build(cfg, family)
    state, rng = ms.fresh(), np.random.default_rng(0)
    factors = [1.0, 0.1, 0.1, 1.0, 0.25]  # a cool-down in the middle, as after a rollback
    for step, factor in enumerate(factors):
        before = jax.device_get(state)
        batch = put_train_batch(family.synthetic_batch(cfg, rng), ms.mesh, 1)
        state, metrics = ms.train_step(state, batch, step_controls(factor))
        logged = float(metrics["lr"])
        scheduled = float(ms.learning_rate.schedule(step))
        assert logged == pytest.approx(scheduled * factor, rel=1e-6), step
        assert applied_lr(before, jax.device_get(state), cfg) == pytest.approx(logged, rel=2e-3)
    assert float(ms.learning_rate(4)) == pytest.approx(float(ms.learning_rate.schedule(4)))
    # The factor is a traced input: five factors, one compiled step.
    assert ms.train_step.jitted._cache_size() == 1
