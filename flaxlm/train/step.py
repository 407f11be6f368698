"""Jitted train and eval steps, the same for every model family.

A batch is a dict of ``(A, b, X)`` arrays: ``A`` gradient-accumulation micro-batches of ``b``
rows each (``A * b`` = the global batch), split over the (data, fsdp) mesh axes along ``b``.
The family (flaxlm/families/) supplies the loss: its ``loss_scales`` see the whole step's
batch, so the micro-batches' scaled objectives add up to the step's loss and accumulation
gives the same update as one big batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training.train_state import TrainState
from jax.sharding import Mesh

from flaxlm.config import Config
from flaxlm.families import Family
from flaxlm.parallel.sharding import LOGICAL_RULES, batch_sharding, micro_batch_sharding, replicated
from flaxlm.train import moe_terms
from flaxlm.train.optim import LearningRate


def make_train_step(
    model: nn.Module, family: Family, cfg: Config, learning_rate: LearningRate
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step ``(state, batch, controls) -> (state, metrics)``; jit it with
    :func:`jit_train_step`. ``controls`` (:func:`step_controls`): ``lr_factor``, an f32 the
    optimizer multiplies the scheduled LR by (the cool-down after a rollback); traced, so a
    new value does not recompile. ``metrics["lr"]`` is ``learning_rate(step, lr_factor)``,
    the rate the optimizer's update applies (flaxlm/train/optim.py)."""
    base_rng = jax.random.key(cfg.train.seed)
    deterministic = cfg.model.dropout == 0.0

    def train_step(state: TrainState, batch: dict[str, jax.Array], controls: dict[str, jax.Array]):
        step_rng = jax.random.fold_in(jax.random.fold_in(base_rng, 1), state.step)
        scales = family.loss_scales(cfg, batch)
        n_micro = next(iter(batch.values())).shape[0]  # every key: (micro-batches, b, ...)
        grad_fn = jax.value_and_grad(moe_terms.with_moe(family.loss, cfg, n_micro), has_aux=True)

        def micro(carry, xs):
            grads_acc, metrics_acc = carry
            index, mb = xs
            rng = jax.random.fold_in(step_rng, index)
            (_, metrics), grads = grad_fn(state.params, mb, model, cfg, scales, rng, deterministic)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
            return (grads_acc, metrics_acc), None

        zero_metrics = family.zero_metrics(cfg, batch) | moe_terms.zero_metrics(cfg)
        zeros = (jax.tree.map(jnp.zeros_like, state.params), zero_metrics)
        if n_micro == 1:  # no scan: XLA fuses better without the loop
            (grads, metrics), _ = micro(zeros, (0, jax.tree.map(lambda x: x[0], batch)))
        else:
            (grads, metrics), _ = jax.lax.scan(micro, zeros, (jnp.arange(n_micro), batch))
        new_state, grad_norm = apply_update(state, grads, controls["lr_factor"])
        new_state = moe_terms.update_router_bias(state.params, new_state, metrics, cfg)
        out = family.summarize(cfg, metrics, jnp) | moe_terms.summarize(metrics)
        out["grad_norm"] = grad_norm
        out["lr"] = learning_rate(state.step, controls["lr_factor"])
        return new_state, out

    return train_step


def apply_update(state: TrainState, grads, lr_factor: jax.Array):
    """One optimizer update with the final gradients, its scheduled LR times ``lr_factor``.
    Returns (new state, gradient norm before clipping)."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, lr_factor=lr_factor)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
    )
    return new_state, grad_norm


def step_controls(lr_factor: float = 1.0) -> dict[str, np.ndarray]:
    """The per-step control inputs of the train step (host values; jit moves them)."""
    return {"lr_factor": np.float32(lr_factor)}


def make_eval_step(
    model: nn.Module, family: Family, cfg: Config
) -> Callable[..., dict[str, jax.Array]]:
    """``(params, batch) -> summed metrics`` for one ``(b, X)`` batch (no micro-batch axis)."""

    def eval_step(params, batch: dict[str, jax.Array]):
        scales = family.loss_scales(cfg, batch)
        loss = moe_terms.with_moe(family.loss, cfg)
        _, metrics = loss(params, batch, model, cfg, scales, jax.random.key(0), True)
        return metrics

    return eval_step


def jit_train_step(train_step, mesh: Mesh, state_sh: Any, batch_keys: tuple[str, ...]):
    """jit with explicit shardings; the old state is donated so its buffers are reused."""
    batch_sh = {k: micro_batch_sharding(mesh) for k in batch_keys}
    jitted = jax.jit(
        train_step,
        in_shardings=(state_sh, batch_sh, replicated(mesh)),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=(0,),
    )
    return WithRules(jitted, mesh)


def jit_eval_step(eval_step, mesh: Mesh, params_sh: Any, batch_keys: tuple[str, ...]):
    jitted = jax.jit(
        eval_step,
        in_shardings=(params_sh, {k: batch_sharding(mesh) for k in batch_keys}),
        out_shardings=replicated(mesh),
    )
    return WithRules(jitted, mesh)


class WithRules:
    """A jitted function that traces (and lowers) with the mesh and the logical rules in
    scope, which the model's sharding constraints need."""

    def __init__(self, jitted, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return self.jitted(*args)

    def lower(self, *args):
        """Ahead-of-time lowering on (abstract) arguments, e.g. for memory planning."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return self.jitted.lower(*args)
