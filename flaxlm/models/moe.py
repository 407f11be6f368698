"""Mixture-of-Experts feed-forward (``model.moe``): a learned router sends each token to its
``top_k`` of ``num_experts`` expert MLPs and mixes their outputs by the router's weights.

- **Router**: ``softmax(x W_router)`` in float32; the top-k weights are renormalised to sum to
  1 (Mixtral). Two auxiliary losses keep it healthy: load balancing
  ``E * sum_e f_e * P_e`` (f_e: share of the T*k assignments going to expert e, P_e: the mean
  router probability of e; 1 when perfectly balanced; Switch Transformer / Mixtral) and the
  router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE), weighted by ``load_balance_loss`` and
  ``router_z_loss``.
- **Dropless** (``capacity_factor: 0``, the default): the T*k (token, expert) pairs are sorted
  by expert and each expert's rows go through its weights as one grouped matmul
  (``jax.lax.ragged_dot``); nothing is dropped and nothing is padded.
- **Capacity** (``capacity_factor`` c > 0): each expert takes at most ``ceil(c * T * k / E)``
  tokens (first choices first, then in token order), dispatched with one-hot einsums
  (GShard); the rest of a dropped token's output is its other experts' (or zero: the
  residual carries it). The share dropped is reported.
- **Experts** are stacked along a leading ``expert`` axis, which the rules table maps to the
  ``expert`` mesh axis (expert parallelism).

Per layer the module sows into the ``moe`` collection: the weighted auxiliary loss, the
tokens per expert and the tokens dropped; :func:`collect` sums them over the layers.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxlm.config import ModelConfig
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
        n_exp, k, d, f = moe.num_experts, moe.top_k, cfg.d_model, cfg.d_ff
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        batch, length, _ = x_BxLxD.shape
        x_TxD = x_BxLxD.reshape(-1, d)

        def weight(name: str, shape: tuple[int, ...], names: tuple[str, ...], std: float):
            init = nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)
            return self.param(name, init, shape, pdtype)

        router_DxE = weight("router", (d, n_exp), ("embed", None), cfg.init_std)
        gated = cfg.activation == "swiglu"
        w_up = weight("up", (n_exp, d, f), ("expert", "embed", "mlp"), cfg.init_std)
        w_gate = (
            weight("gate", (n_exp, d, f), ("expert", "embed", "mlp"), cfg.init_std)
            if gated
            else None
        )
        down_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        w_down = weight("down", (n_exp, f, d), ("expert", "mlp", "embed"), down_std)

        logits_TxE = jnp.dot(x_TxD.astype(jnp.float32), router_DxE.astype(jnp.float32))
        probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
        top_p_TxK, top_e_TxK = jax.lax.top_k(probs_TxE, k)
        top_p_TxK = top_p_TxK / jnp.sum(top_p_TxK, axis=-1, keepdims=True)

        def expert_ffn(x_NxD, up, gate, down, matmul):
            h = matmul(x_NxD, up)
            if gated:
                h = jax.nn.silu(matmul(x_NxD, gate).astype(jnp.float32)) * h.astype(jnp.float32)
            else:
                h = activation_fn(cfg.activation)(h.astype(jnp.float32))
            return matmul(h.astype(dtype), down)

        args = (
            w_up.astype(dtype),
            None if w_gate is None else w_gate.astype(dtype),
            w_down.astype(dtype),
        )
        if moe.capacity_factor > 0:
            y_TxD, kept = _capacity_route(x_TxD.astype(dtype), top_p_TxK, top_e_TxK, n_exp,
                                          moe.capacity_factor, expert_ffn, args)  # fmt: skip
        else:
            y_TxD, kept = _dropless_route(x_TxD.astype(dtype), top_p_TxK, top_e_TxK, n_exp,
                                          expert_ffn, args)  # fmt: skip

        assigned_E = jnp.sum(jax.nn.one_hot(top_e_TxK, n_exp, dtype=jnp.float32), axis=(0, 1))
        balance = n_exp * jnp.sum(assigned_E / (x_TxD.shape[0] * k) * jnp.mean(probs_TxE, axis=0))
        z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE, axis=-1)))
        aux = moe.load_balance_loss * balance + moe.router_z_loss * z
        self.sow(COLLECTION, "aux_loss", aux)
        self.sow(COLLECTION, "expert_tokens", assigned_E)
        self.sow(COLLECTION, "dropped", x_TxD.shape[0] * k - kept)
        return y_TxD.reshape(batch, length, d).astype(dtype)


def _ragged(x_NxI: Array, w_ExIxO: Array, group_sizes_E: Array) -> Array:
    return jax.lax.ragged_dot(x_NxI, w_ExIxO, group_sizes_E, preferred_element_type=jnp.float32)


def _dropless_route(x_TxD, top_p_TxK, top_e_TxK, n_exp, expert_ffn, args):
    """Every (token, expert) pair, sorted by expert, through grouped matmuls."""
    tokens, k = top_e_TxK.shape
    flat_e = top_e_TxK.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    token_of = order // k
    group_sizes_E = jnp.bincount(flat_e, length=n_exp).astype(jnp.int32)
    up, gate, down = args

    def matmul(x, w):
        return _ragged(x, w, group_sizes_E).astype(x_TxD.dtype)

    y_NxD = expert_ffn(x_TxD[token_of], up, gate, down, matmul).astype(jnp.float32)
    weights_N = top_p_TxK.reshape(-1)[order]
    y_TxD = (
        jnp.zeros((tokens, x_TxD.shape[1]), jnp.float32)
        .at[token_of]
        .add(y_NxD * weights_N[:, None])
    )
    return y_TxD, jnp.asarray(tokens * k, jnp.float32)


def _capacity_route(x_TxD, top_p_TxK, top_e_TxK, n_exp, factor, expert_ffn, args):
    """At most C tokens per expert (first choices first), dispatched by one-hot einsums."""
    tokens, k = top_e_TxK.shape
    capacity = max(1, math.ceil(factor * tokens * k / n_exp))
    onehot_KxTxE = jax.nn.one_hot(top_e_TxK.T, n_exp, dtype=jnp.int32)
    position_KxTxE = (
        jnp.cumsum(onehot_KxTxE.reshape(k * tokens, n_exp), axis=0).reshape(k, tokens, n_exp) - 1
    )
    keep_KxTxE = onehot_KxTxE * (position_KxTxE < capacity)
    slot_KxTxExC = (
        jax.nn.one_hot(position_KxTxE, capacity, dtype=jnp.float32) * keep_KxTxE[..., None]
    )
    dispatch_TxExC = jnp.sum(slot_KxTxExC, axis=0)
    combine_TxExC = jnp.sum(slot_KxTxExC * top_p_TxK.T[:, :, None, None], axis=0)
    x_ExCxD = jnp.einsum("tec,td->ecd", dispatch_TxExC.astype(x_TxD.dtype), x_TxD)
    up, gate, down = args

    def matmul(x, w):
        return jnp.einsum("eci,eio->eco", x, w, preferred_element_type=jnp.float32).astype(
            x_TxD.dtype
        )

    y_ExCxD = expert_ffn(x_ExCxD, up, gate, down, matmul).astype(jnp.float32)
    y_TxD = jnp.einsum("tec,ecd->td", combine_TxExC, y_ExCxD)
    return y_TxD, jnp.sum(keep_KxTxE).astype(jnp.float32)


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
