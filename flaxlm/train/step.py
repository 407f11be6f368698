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


def effective_lr(schedule: optax.Schedule, step: jax.Array, controls: dict) -> jax.Array:
    """The learning rate a step applies: the schedule times ``controls["lr_scale"]`` (the
    rollback cool-down times a chaos spike, from :class:`flaxlm.train.controls.StepControls`).
    The update is scaled by the same factor in :func:`apply_update`."""
    return schedule(step) * controls["lr_scale"]


def make_train_step(
    model: nn.Module, family: Family, cfg: Config, schedule: optax.Schedule
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step ``(state, batch, controls) -> (state, metrics)``; jit it with
    :func:`jit_train_step`. ``controls``: ``lr_scale`` (f32, multiplies the update) and
    ``inject_nan`` (bool, chaos: poison loss and gradients)."""
    base_rng = jax.random.key(cfg.train.seed)
    deterministic = cfg.model.dropout == 0.0

    def train_step(state: TrainState, batch: dict[str, jax.Array], controls: dict[str, jax.Array]):
        step_rng = jax.random.fold_in(jax.random.fold_in(base_rng, 1), state.step)
        scales = family.loss_scales(cfg, batch)
        n_micro = batch["inputs"].shape[0]
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
        poison = jnp.where(controls["inject_nan"], jnp.nan, 0.0)
        grads = jax.tree.map(lambda g: g + poison, grads)
        new_state, grad_norm = apply_update(state, grads, controls)
        out = family.summarize(cfg, metrics, jnp) | moe_terms.summarize(metrics)
        out["loss"] = out["loss"] + poison
        out["grad_norm"] = grad_norm
        out["lr"] = effective_lr(schedule, state.step, controls)
        return new_state, out

    return train_step


def apply_update(state: TrainState, grads, controls: dict[str, jax.Array]):
    """One optimizer update with the final gradients; ``controls["lr_scale"]`` scales it.
    Returns (new state, gradient norm before clipping)."""
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * controls["lr_scale"], updates)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
    )
    return new_state, grad_norm


def step_controls(lr_scale: float = 1.0, inject_nan: bool = False) -> dict[str, np.ndarray]:
    """The per-step control inputs of the train step (host values; jit moves them)."""
    return {"lr_scale": np.float32(lr_scale), "inject_nan": np.bool_(inject_nan)}


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
