"""Mixture-of-Experts feed-forward (``model.moe``): a learned router sends each token to its
``top_k`` of ``num_experts`` expert MLPs and mixes their outputs by the router's weights.

- **Router**: ``softmax(x W_router)`` in float32; the top-k weights are renormalised to sum to
  1 (Mixtral). Two auxiliary losses keep it healthy: load balancing
  ``E * sum_e f_e * P_e`` (f_e: share of the T*k assignments going to expert e, P_e: the mean
  router probability of e; 1 when perfectly balanced; Switch Transformer / Mixtral) and the
  router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE), weighted by ``load_balance_loss`` and
  ``router_z_loss``.
- **Sigmoid router** (``router: sigmoid``, DeepSeek-V3): scores ``sigmoid(x W_router)``; the
  top-k is chosen on scores plus a per-expert ``router_bias`` that gets no gradient (the train
  step moves it toward balance, flaxlm/train/moe_terms.py), and the chosen scores, renormalised,
  weight the experts. The bias lives among the parameters, so checkpoints carry it.
- **Shared experts** (``shared_experts`` n) run on every token beside the routed ones, as one
  MLP n times an expert's width; **fine-grained experts**: ``d_expert`` sets the experts' width.
- **Dropless** (``capacity_factor: 0``, the default): every (token, expert) pair goes through
  its expert; nothing is dropped.
- **Capacity** (``capacity_factor`` c > 0): each expert takes at most ``ceil(c * T * k / E)``
  tokens of the global batch (first choices first, then in token order); the rest of a
  dropped token's output is its other experts' (or zero: the residual carries it). The share
  dropped is reported.
- **Receive buffers** (``buffer_factor`` f, expert parallelism only): 0 (the default) sizes
  each device's buffer for the worst case, nothing dropped; f > 0 holds f times a device's
  own pairs and drops what overflows (counted in ``dropped``), as MaxText's
  ``ragged_buffer_factor``.
- **Experts** are stacked along a leading ``expert`` axis, which the rules table maps to the
  ``expert`` mesh axis; flaxlm/models/moe_dispatch.py sends each kept pair to the device holding
  its expert (all-to-all inside ``shard_map``) and runs the local experts as grouped matmuls
  (flaxlm/models/moe_ffn.py: in rematerialised row chunks when the receive buffer is large).

Per layer the module sows into the ``moe`` collection: the weighted auxiliary loss, the
tokens per expert and the tokens dropped; :func:`collect` sums them over the layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxlm.config import ModelConfig
from flaxlm.models.moe_dispatch import expert_parallel_mlp
from flaxlm.models.moe_ffn import grouped_ffn
from flaxlm.models.norm_act import activation_fn

Array = jax.Array
COLLECTION = "moe"


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """MoE in every ``moe.every``-th block (the last of each group: 1, 2 -> blocks 1, 3, ...)."""
    moe = cfg.moe
    return moe.num_experts > 0 and (layer + 1) % max(moe.every, 1) == 0


class MoEMLP(nn.Module):
    """The expert FFN replacing a block's MLP: ``x_BxLxD -> y_BxLxD``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        cfg, moe = self.cfg, self.cfg.moe
        n_exp, k, d = moe.num_experts, moe.top_k, cfg.d_model
        f = moe.d_expert or cfg.d_ff
        dtype = jnp.dtype(cfg.dtype)
        tokens = x_BxLxD.shape[0] * x_BxLxD.shape[1]
        router_DxE = self._weight("router", (d, n_exp), ("embed", None), cfg.init_std)
        weights = self._expert_weights(n_exp, f)

        logits_BxLxE = jnp.dot(x_BxLxD.astype(jnp.float32), router_DxE.astype(jnp.float32))
        probs_BxLxE, top_p_BxLxK, top_e_BxLxK = self._route(logits_BxLxE)
        if moe.capacity_factor > 0:
            keep_BxLxK = _within_capacity(top_e_BxLxK, n_exp, moe.capacity_factor)
        else:
            keep_BxLxK = jnp.ones(top_e_BxLxK.shape, bool)
        y_BxLxD, buffer_dropped = expert_parallel_mlp(
            x_BxLxD.astype(dtype),
            jnp.where(keep_BxLxK, top_e_BxLxK, n_exp),
            jnp.where(keep_BxLxK, top_p_BxLxK, 0.0),
            tuple(None if w is None else w.astype(dtype) for w in weights),
            functools.partial(grouped_ffn, activation=cfg.activation, dtype=dtype),
            buffer_factor=moe.buffer_factor,
        )
        if moe.shared_experts:
            y_BxLxD = y_BxLxD + self._shared(x_BxLxD.astype(dtype), f * moe.shared_experts)

        assigned_E = jnp.sum(jax.nn.one_hot(top_e_BxLxK, n_exp, dtype=jnp.float32), axis=(0, 1, 2))
        mean_p_E = jnp.mean(probs_BxLxE, axis=(0, 1))
        balance = n_exp * jnp.sum(assigned_E / (tokens * k) * mean_p_E)
        z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_BxLxE, axis=-1)))
        aux = moe.load_balance_loss * balance + moe.router_z_loss * z
        self.sow(COLLECTION, "aux_loss", aux)
        self.sow(COLLECTION, "expert_tokens", assigned_E)
        dropped = jnp.sum(~keep_BxLxK).astype(jnp.float32) + buffer_dropped
        self.sow(COLLECTION, "dropped", dropped)
        return y_BxLxD.astype(dtype)

    def _route(self, logits_BxLxE: Array) -> tuple[Array, Array, Array]:
        """(router probabilities for the balance loss, top-k weights summing to 1, top-k
        experts). softmax: top-k of the probabilities. sigmoid (DeepSeek-V3): top-k of the
        scores plus ``router_bias`` (selection only: no gradient, moved by the train step),
        weighted by their scores."""
        moe = self.cfg.moe
        if moe.router == "sigmoid":
            scores_BxLxE = jax.nn.sigmoid(logits_BxLxE)
            bias_E = self.param(
                "router_bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                (moe.num_experts,),
                jnp.float32,
            )
            _, top_e = jax.lax.top_k(scores_BxLxE + jax.lax.stop_gradient(bias_E), moe.top_k)
            top_p = jnp.take_along_axis(scores_BxLxE, top_e, axis=-1)
            probs_BxLxE = scores_BxLxE / jnp.sum(scores_BxLxE, axis=-1, keepdims=True)
        else:
            probs_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
            top_p, top_e = jax.lax.top_k(probs_BxLxE, moe.top_k)
        return probs_BxLxE, top_p / jnp.sum(top_p, axis=-1, keepdims=True), top_e

    def _weight(self, name: str, shape: tuple[int, ...], names: tuple, std: float) -> Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)
        return self.param(name, init, shape, jnp.dtype(self.cfg.param_dtype))

    def _expert_weights(self, n_exp: int, f: int) -> tuple[Array, Array | None, Array]:
        """up_ExDxF, gate_ExDxF (SwiGLU only), down_ExFxD, stacked along ``expert``."""
        cfg, d = self.cfg, self.cfg.d_model
        up = self._weight("up", (n_exp, d, f), ("expert", "embed", "mlp"), cfg.init_std)
        gate = None
        if cfg.activation == "swiglu":
            gate = self._weight("gate", (n_exp, d, f), ("expert", "embed", "mlp"), cfg.init_std)
        down_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        down = self._weight("down", (n_exp, f, d), ("expert", "mlp", "embed"), down_std)
        return up, gate, down

    def _shared(self, x_BxLxD: Array, width: int) -> Array:
        """The always-on shared experts: one MLP of ``shared_experts * d_expert`` hidden units
        (the same as that many experts of width d_expert, each with weight 1)."""
        cfg, d, dtype = self.cfg, self.cfg.d_model, x_BxLxD.dtype
        down_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        up = self._weight("shared_up", (d, width), ("embed", "mlp"), cfg.init_std)
        down = self._weight("shared_down", (width, d), ("mlp", "embed"), down_std)

        def mm(x, w):
            return jnp.dot(x, w.astype(dtype), preferred_element_type=jnp.float32)

        h = mm(x_BxLxD, up)
        if cfg.activation == "swiglu":
            gate = self._weight("shared_gate", (d, width), ("embed", "mlp"), cfg.init_std)
            h = jax.nn.silu(mm(x_BxLxD, gate)) * h
        else:
            h = activation_fn(cfg.activation)(h)
        return mm(h.astype(dtype), down)


def _within_capacity(top_e_BxLxK: Array, n_exp: int, factor: float) -> Array:
    """Which (token, choice) pairs an expert takes: at most ``ceil(c * T * k / E)`` each, first
    choices before second ones, each in token order over the global batch."""
    k = top_e_BxLxK.shape[-1]
    top_e_TxK = top_e_BxLxK.reshape(-1, k)
    tokens = top_e_TxK.shape[0]
    capacity = max(1, math.ceil(factor * tokens * k / n_exp))
    onehot_KTxE = jax.nn.one_hot(top_e_TxK.T.reshape(-1), n_exp, dtype=jnp.int32)
    position_KT = jnp.sum((jnp.cumsum(onehot_KTxE, axis=0) - 1) * onehot_KTxE, axis=-1)
    keep_TxK = (position_KT < capacity).reshape(k, tokens).T
    return keep_TxK.reshape(top_e_BxLxK.shape)


def collect(state: dict[str, Any]) -> dict[str, Array]:
    """The ``moe`` collection of one apply, summed over its layers: ``aux_loss`` (the weighted
    auxiliary losses), ``expert_tokens`` (E,) and ``dropped``."""
    found = state.get(COLLECTION, {})
    out = {"aux_loss": jnp.zeros((), jnp.float32), "dropped": jnp.zeros((), jnp.float32)}
    tokens = None
    for path, leaf in jax.tree_util.tree_flatten_with_path(found)[0]:
        name = str(getattr(path[-2], "key", path[-2])) if len(path) >= 2 else ""
        if name == "expert_tokens":
            per_layer = leaf.reshape(-1, leaf.shape[-1])  # scanned layers stack on axis 0
            tokens = per_layer.sum(0) if tokens is None else tokens + per_layer.sum(0)
        elif name in out:
            out[name] = out[name] + jnp.sum(leaf)
    if tokens is not None:
        out["expert_tokens"] = tokens
    return out
