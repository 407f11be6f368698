"""Jitted train and eval steps.

A batch is a dict of ``(A, b, L)`` arrays: ``A`` gradient-accumulation micro-batches of ``b``
rows each (``A * b`` = the global batch), split over the (data, fsdp) mesh axes along ``b``.
Losses are summed over micro-batches and divided once by the total number of predicted
tokens, so accumulation gives the same update as one big batch.
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxlm.config import Config
from flaxlm.head_loss import fused_lm_loss
from flaxlm.objectives import causal_lm_loss, lm_metrics
from flaxlm.sharding import BATCH_AXES, LOGICAL_RULES

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
MIXTURE_BATCH_KEYS = (*BATCH_KEYS, "source_ids")  # a data mixture also says where rows come from


def batch_shardings(mesh: Mesh, keys: tuple[str, ...] = BATCH_KEYS) -> dict[str, NamedSharding]:
    """Micro-batch axis replicated, rows split over (data, fsdp), length whole."""
    sharding = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))
    return {k: sharding for k in keys}


def _loss_on(
    params, batch, model: nn.Module, cfg: Config, dropout_rng, deterministic: bool, n_sources=0
):
    chunk = cfg.train.head_chunk
    out = model.apply(
        {"params": params},
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        deterministic=deterministic,
        rngs={"dropout": dropout_rng},
        return_hidden=chunk > 0,
    )
    source_ids = batch.get("source_ids") if n_sources else None
    smoothing, z_loss = cfg.train.label_smoothing, cfg.train.z_loss
    if not chunk:
        return causal_lm_loss(
            out, batch["targets"], batch["loss_mask"], smoothing, z_loss, source_ids, n_sources
        )
    tied = cfg.model.tie_embeddings
    head = params["token_embed"]["embedding"] if tied else params["lm_head"]["kernel"]
    objective, ce_BxL, correct_BxL = fused_lm_loss(
        out, head, batch["targets"], batch["loss_mask"], head_is_embedding=tied, chunk=chunk,
        label_smoothing=smoothing, z_loss=z_loss,
    )  # fmt: skip
    return objective, lm_metrics(ce_BxL, correct_BxL, batch["loss_mask"], source_ids, n_sources)


def make_train_step(
    model: nn.Module, cfg: Config, schedule: optax.Schedule, n_sources: int = 0
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step ``(state, batch, controls) -> (state, metrics)``; jit it with
    :func:`jit_train_step`. A ``model.family: bert`` config gets the masked-LM / NSP /
    unified step of :mod:`flaxlm.train.masked_step` (the GPT path below is untouched)."""
    if cfg.model.family == "bert":
        from flaxlm.train import masked_step  # it imports this module's helpers

        return masked_step.make_train_step(model, cfg, schedule)
    base_rng = jax.random.key(cfg.train.seed)
    deterministic = cfg.model.dropout == 0.0

    def train_step(state: TrainState, batch: dict[str, jax.Array], controls: dict[str, jax.Array]):
        """``controls``: ``lr_scale`` (f32, multiplies the update: LR cool-down after a rollback,
        chaos spikes) and ``inject_nan`` (bool, chaos: poison loss and gradients)."""
        step_rng = jax.random.fold_in(jax.random.fold_in(base_rng, 1), state.step)
        grad_fn = jax.value_and_grad(_loss_on, has_aux=True)

        def micro(carry, xs):
            grads_acc, metrics_acc = carry
            index, mb = xs
            rng = jax.random.fold_in(step_rng, index)
            (_, metrics), grads = grad_fn(
                state.params, mb, model, cfg, rng, deterministic, n_sources
            )
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
            return (grads_acc, metrics_acc), None

        n_micro = batch["inputs"].shape[0]
        zeros_grads = jax.tree.map(jnp.zeros_like, state.params)
        zeros_metrics = {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "correct", "n_tokens")}
        if n_sources:
            for key in ("source_ce_sum", "source_tokens"):
                zeros_metrics[key] = jnp.zeros((n_sources,), jnp.float32)
        if n_micro == 1:
            first = jax.tree.map(lambda x: x[0], batch)
            (grads, metrics), _ = micro((zeros_grads, zeros_metrics), (0, first))
        else:
            (grads, metrics), _ = jax.lax.scan(
                micro, (zeros_grads, zeros_metrics), (jnp.arange(n_micro), batch)
            )
        n_tokens = jnp.maximum(metrics["n_tokens"], 1.0)
        poison = jnp.where(controls["inject_nan"], jnp.nan, 0.0)
        grads = jax.tree.map(lambda g: g / n_tokens + poison, grads)
        new_state, grad_norm = apply_update(state, grads, controls)
        out = {
            "loss": metrics["ce_sum"] / n_tokens + poison,
            "accuracy": metrics["correct"] / n_tokens,
            "n_tokens": metrics["n_tokens"],
            "grad_norm": grad_norm,
            "lr": schedule(state.step) * controls["lr_scale"],
        }
        if n_sources:
            out["source_loss"] = metrics["source_ce_sum"] / jnp.maximum(metrics["source_tokens"], 1)
            out["source_tokens"] = metrics["source_tokens"]
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


def make_eval_step(model: nn.Module, cfg: Config) -> Callable[..., dict[str, jax.Array]]:
    """``(params, batch) -> summed metrics`` for one ``(b, L)`` batch (no micro-batch axis)."""
    if cfg.model.family == "bert":
        from flaxlm.train import masked_step

        return masked_step.make_eval_step(model, cfg)

    def eval_step(params, batch: dict[str, jax.Array]):
        _, metrics = _loss_on(params, batch, model, cfg, jax.random.key(0), True)
        return metrics

    return eval_step


def jit_train_step(train_step, mesh: Mesh, state_sh: Any, batch_keys: tuple[str, ...] = BATCH_KEYS):
    """jit with explicit shardings; the old state is donated so its buffers are reused."""
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        train_step,
        in_shardings=(state_sh, batch_shardings(mesh, batch_keys), replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    return _with_rules(jitted, mesh)


def jit_eval_step(eval_step, mesh: Mesh, params_sh: Any, batch_keys: tuple[str, ...] = BATCH_KEYS):
    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))
    jitted = jax.jit(
        eval_step,
        in_shardings=(params_sh, {k: rows for k in batch_keys}),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )
    return _with_rules(jitted, mesh)


class _WithRules:
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


def _with_rules(fn, mesh: Mesh) -> _WithRules:
    return _WithRules(fn, mesh)
