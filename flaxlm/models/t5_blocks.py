"""T5's layers: attention (self or cross), the feed-forward, the encoder and decoder blocks.

Pre-norm blocks (RMSNorm, no biases): encoder ``x + attn(n(x))``, ``x + ffn(n(x))``;
decoder ``x + self_attn(n(x))``, ``x + cross_attn(n(x), encoded)``, ``x + ffn(n(x))``.
The feed-forward is ``act(x W_up) W_down`` (original T5: ReLU), gated
``act(x W_gate) * (x W_up) W_down`` with ``model.t5.gated_mlp`` (v1.1: gated GELU), or a
Mixture-of-Experts (flaxlm/models/moe.py, Switch Transformer style) in the blocks
``model.moe`` names. Parameter names follow flaxlm/models/layers.py (``attn/{query,key,value,
out}``, ``mlp/{up,gate,down}``, ``ln_*``); logical axes as there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from flaxlm.config import ModelConfig
from flaxlm.models import layers
from flaxlm.models.layer_stack import remat_policy
from flaxlm.models.layers import Array, Dense, constrain, dtype_of, kv_heads_of
from flaxlm.models.masks import Mask
from flaxlm.models.moe import MoEMLP
from flaxlm.models.norm_act import activation_fn
from flaxlm.models.t5_attention import t5_attention


class T5Attention(nn.Module):
    """Multi-head attention without biases; queries from ``x``, keys and values from ``x``
    (self) or from the encoder's output (cross). ``project_kv`` is separate so that a decoder
    computes the cross-attention keys and values of an encoded prompt once."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        head_dim = cfg.d_model // cfg.n_heads

        def proj(heads: int) -> Dense:
            return Dense(cfg, (heads, head_dim), ("embed", "heads", "kv"), (), use_bias=False)

        self.query, self.key, self.value = (
            proj(cfg.n_heads),
            proj(kv_heads_of(cfg)),
            proj(kv_heads_of(cfg)),
        )
        self.out = Dense(
            cfg, (cfg.d_model,), ("heads", "kv", "embed"), (), n_in=2, use_bias=False,
            std=layers.residual_std(cfg),
        )  # fmt: skip

    def _heads(self, y_BxLxHxK: Array, name: str) -> Array:
        y_BxLxHxK = y_BxLxHxK.astype(dtype_of(self.cfg.dtype))
        y_BxLxHxK = constrain(y_BxLxHxK, "act_batch", "act_length", "act_heads", "act_kv")
        return checkpoint_name(y_BxLxHxK, name)

    def project_kv(self, source_BxSxD: Array) -> tuple[Array, Array]:
        """The keys and values ``(B, S, N, K)`` of ``source``."""
        return self._heads(self.key(source_BxSxD), "key_proj"), self._heads(
            self.value(source_BxSxD), "value_proj"
        )

    def __call__(
        self,
        x_BxLxD: Array,
        kv: tuple[Array, Array],
        mask: Mask,
        bias_BxHxLxS: Array | None,
    ) -> Array:
        """Queries of ``x`` over the given keys and values; ``bias`` None = no position bias."""
        q_BxLxHxK = self._heads(self.query(x_BxLxD), "query_proj")
        out_BxLxHxK = t5_attention(q_BxLxHxK, *kv, mask, bias_BxHxLxS, self.cfg.attention_impl)
        out_BxLxHxK = constrain(out_BxLxHxK, "act_batch", "act_length", "act_heads", "act_kv")
        out_BxLxHxK = checkpoint_name(out_BxLxHxK, "attention_out")
        return self.out(out_BxLxHxK).astype(dtype_of(self.cfg.dtype))


class T5MLP(nn.Module):
    """``act(x W_up) W_down``, or with ``model.t5.gated_mlp`` ``act(x W_gate) * (x W_up)``
    before ``W_down`` (T5 v1.1's gated GELU). No biases."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        act = activation_fn(cfg.activation)

        def up(name: str) -> Array:
            y = Dense(cfg, (cfg.d_ff,), ("embed", "mlp"), (), use_bias=False, name=name)(x_BxLxD)
            return checkpoint_name(y, f"mlp_{name}")

        h_BxLxF = act(up("gate" if cfg.t5.gated_mlp else "up"))
        if cfg.t5.gated_mlp:
            h_BxLxF = h_BxLxF * up("up").astype(jnp.float32)
        h_BxLxF = constrain(h_BxLxF.astype(dtype), "act_batch", "act_length", "act_mlp")
        h_BxLxF = nn.Dropout(cfg.dropout, deterministic=deterministic)(h_BxLxF)
        h_BxLxF = checkpoint_name(h_BxLxF, "mlp_hidden")
        down = Dense(
            cfg, (cfg.d_model,), ("mlp", "embed"), (), use_bias=False,
            std=layers.residual_std(cfg), name="down",
        )  # fmt: skip
        return down(h_BxLxF).astype(dtype)


class T5Block(nn.Module):
    """One encoder block (``decoder=False``) or decoder block (with cross-attention)."""

    cfg: ModelConfig
    decoder: bool = False
    moe: bool = False

    def setup(self) -> None:
        cfg = self.cfg
        self.ln_attn, self.attn = layers.layer_norm(cfg), T5Attention(cfg)
        if self.decoder:
            self.ln_cross, self.cross_attn = layers.layer_norm(cfg), T5Attention(cfg)
        self.ln_mlp = layers.layer_norm(cfg)
        self.mlp = MoEMLP(cfg) if self.moe else T5MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def _norm(self, norm: nn.Module, x_BxLxD: Array) -> Array:
        return norm(x_BxLxD).astype(dtype_of(self.cfg.dtype))

    def _feed_forward(self, x_BxLxD: Array, deterministic: bool) -> Array:
        h = self._norm(self.ln_mlp, x_BxLxD)
        h = self.mlp(h) if self.moe else self.mlp(h, deterministic)
        x_BxLxD = x_BxLxD + self.drop(h, deterministic=deterministic)
        return constrain(x_BxLxD, "act_batch", "act_length", "act_embed")

    def cross_kv(self, encoded_BxSxD: Array) -> tuple[Array, Array]:
        """The cross-attention keys and values of the encoder's output (decoder blocks)."""
        return self.cross_attn.project_kv(encoded_BxSxD)

    def __call__(
        self,
        x_BxLxD: Array,
        mask: Mask,
        bias_BxHxLxS: Array,
        cross: tuple[tuple[Array, Array], Mask] | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Training / scoring: ``cross`` = (the cross keys and values, the cross mask)."""
        h = self._norm(self.ln_attn, x_BxLxD)
        h = self.attn(h, self.attn.project_kv(h), mask, bias_BxHxLxS)
        x_BxLxD = x_BxLxD + self.drop(h, deterministic=deterministic)
        if self.decoder:
            kv, cross_mask = cross
            h = self.cross_attn(self._norm(self.ln_cross, x_BxLxD), kv, cross_mask, None)
            x_BxLxD = x_BxLxD + self.drop(h, deterministic=deterministic)
        return self._feed_forward(x_BxLxD, deterministic)

    def step(
        self,
        x_Bx1xD: Array,
        cache: dict[str, Array],
        index: Array,
        mask: Mask,
        bias_BxHx1xT: Array,
        cross_mask: Mask,
    ) -> tuple[Array, dict[str, Array]]:
        """One decoding step: this token's keys and values go into the self-attention cache
        at ``index``; cross-attention reads the cached ``cross_key`` / ``cross_value``."""
        h = self._norm(self.ln_attn, x_Bx1xD)
        k_Bx1xNxK, v_Bx1xNxK = self.attn.project_kv(h)
        at = (0, index, 0, 0)
        cache = dict(cache)
        for name, new in (("key", k_Bx1xNxK), ("value", v_Bx1xNxK)):
            cache[name] = jax.lax.dynamic_update_slice(
                cache[name], new.astype(cache[name].dtype), at
            )
        x_Bx1xD = x_Bx1xD + self.attn(h, (cache["key"], cache["value"]), mask, bias_BxHx1xT)
        h = self._norm(self.ln_cross, x_Bx1xD)
        kv = (cache["cross_key"], cache["cross_value"])
        x_Bx1xD = x_Bx1xD + self.cross_attn(h, kv, cross_mask, None)
        return self._feed_forward(x_Bx1xD, True), cache


class T5ScanLayer(nn.Module):
    """One T5 block in ``nn.scan``'s form, for ``model.scan_layers`` (:func:`scanned_layers`):
    each method takes ``(carry, scanned, broadcast, deterministic)`` and returns ``(carry,
    per-layer output)``, so one scan over the layers serves training, the cross keys and
    values of a prompt, and a decoding step."""

    cfg: ModelConfig
    decoder: bool = False

    def setup(self) -> None:
        self.block = T5Block(self.cfg, self.decoder, self.cfg.moe.num_experts > 0)

    def __call__(self, x_BxLxD: Array, _: None, context: tuple, deterministic: bool):
        """``context``: (mask, bias, cross) as :meth:`T5Block.__call__` takes them, except
        that ``cross`` holds the encoder's output (each block projects its own keys)."""
        mask, bias_BxHxLxS, cross = context
        block_cross = None
        if self.decoder:
            encoded_BxSxD, cross_mask = cross
            block_cross = (self.block.cross_kv(encoded_BxSxD), cross_mask)
        return self.block(x_BxLxD, mask, bias_BxHxLxS, block_cross, deterministic), None

    def cross_kv(self, carry: None, _: None, encoded_BxSxD: Array, deterministic: bool):
        return carry, self.block.cross_kv(encoded_BxSxD)

    def step(self, x_Bx1xD: Array, cache: dict[str, Array], context: tuple, deterministic: bool):
        """``cache``: this block's slice; ``context``: (index, mask, bias, cross mask)."""
        return self.block.step(x_Bx1xD, cache, *context)


def scanned_layers(cfg: ModelConfig, decoder: bool, n: int, name: str) -> nn.Module:
    """``n`` blocks as one ``nn.scan``: parameters stacked on a leading axis named ``layers``
    (``<stack>/layers/block/...``), one block compiled whatever the depth. Per-layer inputs
    and outputs (the decoding caches, the cross keys and values) keep the batch on axis 0 and
    the layers on axis 1, so beam search reorders every cache leaf on axis 0 as unscanned."""
    layer = T5ScanLayer
    if cfg.remat != "none":
        # static_argnums counts ``self`` as 0: ``deterministic`` is argument 4.
        layer = nn.remat(layer, policy=remat_policy(cfg), prevent_cse=False, static_argnums=(4,))
    scan = nn.scan(
        layer,
        variable_axes={"params": 0, "moe": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(1, nn.broadcast, nn.broadcast),
        out_axes=1,
        length=n,
        metadata_params={nn.PARTITION_NAME: "layers"},
        methods=["__call__", "cross_kv", "step"],
    )
    return scan(cfg, decoder, name=name)
