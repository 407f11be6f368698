"""The MoE terms of a train step, for every family alike: the routers' auxiliary losses join
the objective, and the routing statistics join the metrics (flaxlm/models/moe.py sows them).

The family's loss function is called with a :class:`Capture` in place of the model: the same
``apply`` and methods, but every ``apply`` also collects the ``moe`` collection. So a family
needs no MoE code of its own (GPT, Llama-style and BERT encoders alike).

Each micro-batch's auxiliary loss is a mean over its tokens; the step adds ``aux / A`` for
``A`` equal micro-batches, so accumulation gives the loss of one big batch.

The sigmoid router's ``router_bias`` (``model.moe.router: sigmoid``) is balanced without a
loss, as DeepSeek-V3 does: each step counts the tokens every MoE layer sent to each expert
(``moe_layer_tokens``, summed over micro-batches) and :func:`update_router_bias` moves the bias
by ``bias_update_rate`` up for experts below the mean load and down for those above, in place
of whatever the optimizer did to it. The bias is a parameter leaf, so checkpoints carry it and
a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flaxlm.config import Config
from flaxlm.models import moe

# What the metrics of an MoE step carry, summed over micro-batches (and eval batches).
MOE_KEYS = ("moe_aux_loss", "moe_expert_tokens", "moe_dropped", "moe_batches")
BIAS = "router_bias"


class Capture:
    """A model whose ``apply`` also collects the MoE statistics of the call."""

    def __init__(self, model: Any):
        self.model = model
        self.stats: list[dict[str, jax.Array]] = []
        self.states: list[Any] = []

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        if "mutable" in kwargs:
            return self.model.apply(variables, *args, **kwargs)
        out, state = self.model.apply(variables, *args, mutable=[moe.COLLECTION], **kwargs)
        self.stats.append(moe.collect(state))
        self.states.append(state.get(moe.COLLECTION, {}))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def enabled(cfg: Config) -> bool:
    return cfg.model.moe.num_experts > 0


def updates_bias(cfg: Config) -> bool:
    """Whether the step moves a sigmoid router's bias (flaxlm/models/moe.py)."""
    return enabled(cfg) and cfg.model.moe.router == "sigmoid" and cfg.model.moe.bias_update_rate > 0


def zero_metrics(cfg: Config) -> dict[str, jax.Array]:
    if not enabled(cfg):
        return {}
    n_exp = cfg.model.moe.num_experts
    zeros = {k: jnp.zeros((), jnp.float32) for k in MOE_KEYS}
    zeros["moe_expert_tokens"] = jnp.zeros((n_exp,), jnp.float32)
    if updates_bias(cfg):
        layers = sum(moe.is_moe_layer(cfg.model, i) for i in range(cfg.model.n_layers))
        zeros["moe_layer_tokens"] = jnp.zeros((layers, n_exp), jnp.float32)
    return zeros


def _name(key: Any) -> str:
    return str(getattr(key, "key", key))


def _layer_tokens(params: Any, states: list[Any], n_exp: int) -> jax.Array:
    """(MoE layers, E): the tokens each biased router sent to each expert, in the order of
    the ``router_bias`` leaves of ``params`` (a scanned stack gives one row per layer)."""
    rows = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        if _name(path[-1]) != BIAS:
            continue
        total = jnp.zeros((), jnp.float32)
        for state in states:
            node = state
            for key in (*path[:-1], "expert_tokens"):
                node = node[_name(key)]
            total = total + node[0]
        rows.append(total.reshape(-1, n_exp))
    return jnp.concatenate(rows)


def update_router_bias(old_params: Any, new_state: Any, metrics: dict[str, Any], cfg: Config):
    """``new_state`` with every ``router_bias`` = its value before the step + ``rate *
    sign(mean load - load)`` from this step's ``moe_layer_tokens`` (unchanged for other
    routers)."""
    if not updates_bias(cfg):
        return new_state
    loads_MxE = metrics["moe_layer_tokens"]
    delta_MxE = cfg.model.moe.bias_update_rate * jnp.sign(
        jnp.mean(loads_MxE, axis=-1, keepdims=True) - loads_MxE
    )
    flat, treedef = jax.tree_util.tree_flatten_with_path(new_state.params)
    row, leaves = 0, []
    for (path, new), old in zip(flat, jax.tree.leaves(old_params), strict=True):
        if _name(path[-1]) == BIAS:
            n = old.size // loads_MxE.shape[-1]
            new = old + delta_MxE[row : row + n].reshape(old.shape).astype(old.dtype)
            row += n
        leaves.append(new)
    return new_state.replace(params=jax.tree_util.tree_unflatten(treedef, leaves))


def with_moe(loss_fn: Callable, cfg: Config, n_micro: int = 1) -> Callable:
    """``loss_fn`` (a family's ``loss``) plus the MoE auxiliary loss and statistics; unchanged
    for a dense model."""
    if not enabled(cfg):
        return loss_fn

    def loss(params, mb, model, cfg, scales, rng, deterministic):
        capture = Capture(model)
        objective, metrics = loss_fn(params, mb, capture, cfg, scales, rng, deterministic)
        aux = sum((s["aux_loss"] for s in capture.stats), jnp.zeros((), jnp.float32))
        metrics = dict(metrics)
        metrics["moe_aux_loss"] = aux
        none = jnp.zeros((cfg.model.moe.num_experts,), jnp.float32)
        metrics["moe_expert_tokens"] = sum(
            (s.get("expert_tokens", none) for s in capture.stats), none
        )
        metrics["moe_dropped"] = sum((s["dropped"] for s in capture.stats), jnp.zeros(()))
        metrics["moe_batches"] = jnp.ones((), jnp.float32)
        if updates_bias(cfg):
            n_exp = cfg.model.moe.num_experts
            metrics["moe_layer_tokens"] = _layer_tokens(params, capture.states, n_exp)
        return objective + aux / n_micro, metrics

    return loss


def summarize(metrics: dict[str, Any], xp=jnp) -> dict[str, Any]:
    """Summed MoE metrics -> the mean auxiliary loss, each expert's share of the routed
    tokens, and the share dropped by the capacity limit; {} for a dense model."""
    if "moe_aux_loss" not in metrics:
        return {}
    routed = xp.maximum(xp.sum(metrics["moe_expert_tokens"]), 1.0)
    return {
        "moe_aux_loss": metrics["moe_aux_loss"] / xp.maximum(metrics["moe_batches"], 1.0),
        "moe_load": metrics["moe_expert_tokens"] / routed,
        "moe_dropped": metrics["moe_dropped"] / routed,
    }


def log_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.jsonl fields: the auxiliary loss, the busiest and idlest expert's share of the
    tokens (1/E each when balanced), the share dropped, and every expert's share."""
    if "moe_load" not in metrics:
        return {}
    load = [float(x) for x in metrics["moe_load"]]
    return {
        "moe_aux_loss": float(metrics["moe_aux_loss"]),
        "moe_load_max": max(load),
        "moe_load_min": min(load),
        "moe_dropped": float(metrics["moe_dropped"]),
        "moe_load": load,
    }
