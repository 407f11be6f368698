"""Transformer building blocks shared by the decoders (GPT, Llama, MoE) and the BERT encoder.

Shape suffixes: B batch, L length (query), S length (key), D d_model, H heads, K head dim,
F d_ff, V vocab. Every parameter carries logical axis names (see ``flaxlm.parallel.sharding``) and
key
activations carry ``act_*`` constraints; both are no-ops until a mesh and rules are active.

Mixed precision: parameters live in ``cfg.param_dtype``; matmuls take ``cfg.dtype`` inputs and
accumulate in float32; LayerNorm and softmax run in float32; activations between layers are
stored in ``cfg.dtype``. Every matmul has a hand-written backward (flaxlm/models/matmul.py):
with bf16 its products are bf16 x bf16 -> f32 too; attention is flaxlm/models/attention.py.
``cfg.custom_backward`` turns these (and LayerNorm's, GELU's) on or off together
(flaxlm/models/backward.py).
Depth (remat, scan over layers) is in flaxlm/models/layer_stack.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from flaxlm.config import ModelConfig
from flaxlm.models.attention import attention
from flaxlm.models.backward import use_custom_backward
from flaxlm.models.masks import Mask
from flaxlm.models.matmul import matmul
from flaxlm.models.moe import MoEMLP
from flaxlm.models.norm_act import LayerNorm, RMSNorm, activation_fn, swiglu

Array = jax.Array

NORM_PLACEMENTS = ("pre", "post")


def dtype_of(name: str) -> jnp.dtype:
    """``"bfloat16"`` -> ``jnp.bfloat16``; raises on names jnp does not know."""
    return jnp.dtype(name)


def constrain(x: Array, *names: str) -> Array:
    """Logical sharding constraint on an activation; a no-op without active axis rules."""
    return nn.with_logical_constraint(x, names)


def normal_init(std: float, names: tuple[str, ...]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def zeros_init(names: tuple[str, ...]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class Dense(nn.Module):
    """``y = x . kernel + bias`` contracting the last ``n_in`` axes of x; kernel shape is
    ``x.shape[-n_in:] + features``. Inputs are cast to ``cfg.dtype`` and the product is
    accumulated (and returned) in float32; callers cast where they store activations.

    Why not ``nn.DenseGeneral``: it initialises a multi-axis kernel as a flat 2-D array and
    unboxes its logical names on that, which fails under a mesh (3 names, rank 2); and
    bf16 x bf16 -> bf16 dots are both less exact and slower on our CPUs than bf16 inputs
    accumulated in f32 (benchmarks/RESULTS.md, "CPU matmul precision").
    """

    cfg: ModelConfig
    features: tuple[int, ...]
    kernel_names: tuple[str, ...]
    bias_names: tuple[str, ...]
    n_in: int = 1
    std: float | None = None  # default cfg.init_std
    use_bias: bool | None = None  # default cfg.use_bias

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        in_shape = x.shape[x.ndim - self.n_in :]
        std = cfg.init_std if self.std is None else self.std
        kernel = self.param(
            "kernel",
            normal_init(std, self.kernel_names),
            in_shape + tuple(self.features),
            dtype_of(cfg.param_dtype),
        )
        dtype = dtype_of(cfg.dtype)
        batch_shape, n_in = x.shape[: x.ndim - self.n_in], math.prod(in_shape)
        x_NxI = x.astype(dtype).reshape(-1, n_in)
        kernel_IxF = kernel.astype(dtype).reshape(n_in, -1)
        y = matmul(x_NxI, kernel_IxF, custom_backward=use_custom_backward(cfg))
        y = y.reshape(*batch_shape, *self.features)
        if cfg.use_bias if self.use_bias is None else self.use_bias:
            bias = self.param(
                "bias", zeros_init(self.bias_names), tuple(self.features), dtype_of(cfg.param_dtype)
            )
            y = y + bias.astype(jnp.float32)
        return y


def layer_norm(cfg: ModelConfig, name: str | None = None) -> LayerNorm | RMSNorm:
    """The configured norm (``model.norm``: LayerNorm or RMSNorm), computed in float32 (its
    variance is what bf16 gets wrong first)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(
            epsilon=cfg.norm_eps,
            param_dtype=dtype_of(cfg.param_dtype),
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            name=name,
        )
    return LayerNorm(
        epsilon=cfg.norm_eps,
        use_bias=cfg.use_bias,
        param_dtype=dtype_of(cfg.param_dtype),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=zeros_init(("norm",)),
        custom_backward=use_custom_backward(cfg),
        name=name,
    )


def residual_std(cfg: ModelConfig) -> float:
    """GPT-2 init: projections that write into the residual stream are scaled by
    1/sqrt(2 n_layers), so the stream's variance does not grow with depth."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


# --- positions ------------------------------------------------------------------------------


def sinusoidal_embedding(positions_BxL: Array, dim: int, max_timescale: float = 1e4) -> Array:
    """Fixed sinusoidal positions (Vaswani et al.), ``[sin | cos]`` halves: ``x_BxLxD`` f32.

    Computed from the given positions rather than a table, so packed documents restart at 0.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {dim}")
    inv_freq = 1.0 / (max_timescale ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    angles_BxLxD2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq
    return jnp.concatenate([jnp.sin(angles_BxLxD2), jnp.cos(angles_BxLxD2)], axis=-1)


def apply_rope(x_BxLxHxK: Array, positions_BxL: Array, theta: float) -> Array:
    """Rotary position embedding, "rotate half" layout (GPT-NeoX / LLaMA).

    Feature pairs (i, i + K/2) are rotated by angle ``pos * theta^(-2i/K)``, so the dot product
    of a rotated query and key depends only on their position difference. Computed in f32.
    """
    head_dim = x_BxLxHxK.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rope needs an even head dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq
    sin_BxLx1xK2 = jnp.sin(angles_BxLxK2)[:, :, None, :]
    cos_BxLx1xK2 = jnp.cos(angles_BxLxK2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate(
        [x1 * cos_BxLx1xK2 - x2 * sin_BxLx1xK2, x2 * cos_BxLx1xK2 + x1 * sin_BxLx1xK2], axis=-1
    )
    return rotated.astype(x_BxLxHxK.dtype)


# --- embeddings -----------------------------------------------------------------------------


class TokenEmbed(nn.Embed):
    """``nn.Embed`` whose ``attend`` (the tied LM head) accumulates and returns float32."""

    custom_backward: bool | None = None  # of the head's matmul (flaxlm/models/matmul.py)

    def attend(self, query: Array) -> Array:
        query, embedding = self.promote_dtype(query, self.embedding, dtype=self.dtype)
        query_NxD = query.reshape(-1, query.shape[-1])
        logits_NxV = matmul(query_NxD, embedding, True, self.custom_backward)
        return logits_NxV.reshape(*query.shape[:-1], -1)


def token_embed(cfg: ModelConfig, name: str = "token_embed") -> TokenEmbed:
    return TokenEmbed(
        num_embeddings=cfg.vocab_size,
        features=cfg.d_model,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        embedding_init=normal_init(cfg.init_std, ("vocab", "embed")),
        custom_backward=use_custom_backward(cfg),
        name=name,
    )


def position_embed(cfg: ModelConfig, name: str = "position_embed") -> nn.Embed:
    """The learned position table ``(max_seq_len, d_model)``."""
    return nn.Embed(
        num_embeddings=cfg.max_seq_len,
        features=cfg.d_model,
        dtype=dtype_of(cfg.dtype),
        param_dtype=dtype_of(cfg.param_dtype),
        embedding_init=normal_init(cfg.init_std, ("position", "embed")),
        name=name,
    )


# --- attention, MLP, block ------------------------------------------------------------------


def kv_heads_of(cfg: ModelConfig) -> int:
    """``model.n_kv_heads``, with 0 meaning as many as ``n_heads``."""
    return cfg.n_kv_heads or cfg.n_heads


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections.

    ``n_kv_heads`` key/value heads (0 = n_heads; fewer = grouped-query / multi-query
    attention). The mask (flaxlm/models/masks.py) comes from the caller: causal + segment for
    GPT, segment-only for an encoder, per-row prefix LM for the unified objective.
    No dropout on the attention probabilities (``model.attention_impl`` picks the kernel,
    flaxlm/models/attention.py); the output projection's dropout is applied by the block.

    Decoding (``cache_index`` given): keys and values of the new tokens are written into the
    "cache" collection at ``cache_index`` and the queries attend over the whole cache; the
    mask (from the caller) hides slots not yet written. Training never takes this branch.
    """

    cfg: ModelConfig
    causal: bool = False  # the mask hides every later key (GPT): see model.causal_block

    @nn.compact
    def __call__(
        self,
        x_BxLxD: Array,
        mask: Mask,
        positions_BxL: Array,
        cache_index: Array | None = None,
    ) -> Array:
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        head_dim = cfg.d_model // cfg.n_heads

        def project(name: str, heads: int) -> Array:
            layer = Dense(
                cfg, (heads, head_dim), ("embed", "heads", "kv"), ("heads", "kv"), name=name
            )
            y_BxLxHxK = layer(x_BxLxD).astype(dtype)
            y_BxLxHxK = constrain(y_BxLxHxK, "act_batch", "act_length", "act_heads", "act_kv")
            # A name remat policies can keep (flaxlm/models/layer_stack.py): "query_proj", ...
            return checkpoint_name(y_BxLxHxK, f"{name}_proj")

        kv_heads = kv_heads_of(cfg)
        q_BxLxHxK = project("query", cfg.n_heads)
        k_BxSxNxK, v_BxSxNxK = project("key", kv_heads), project("value", kv_heads)
        if cfg.positions == "rope":
            q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, cfg.rope_theta)
            k_BxSxNxK = apply_rope(k_BxSxNxK, positions_BxL, cfg.rope_theta)
        if cache_index is not None:
            k_BxSxNxK, v_BxSxNxK = self._cached(k_BxSxNxK, v_BxSxNxK, cache_index)

        causal_block = cfg.causal_block if self.causal else 0
        out_BxLxHxK = attention(
            q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask, cfg.attention_impl, causal_block,
            use_custom_backward(cfg),
        )  # fmt: skip
        out_BxLxHxK = constrain(out_BxLxHxK, "act_batch", "act_length", "act_heads", "act_kv")
        out_BxLxHxK = checkpoint_name(out_BxLxHxK, "attention_out")  # the out projection's input
        out = Dense(
            cfg,
            (cfg.d_model,),
            ("heads", "kv", "embed"),
            ("embed",),
            n_in=2,
            std=residual_std(cfg),
            name="out",
        )
        return out(out_BxLxHxK).astype(dtype)

    def _cached(self, k_BxLxHxK: Array, v_BxLxHxK: Array, index: Array) -> tuple[Array, Array]:
        """Writes the new keys/values at ``index``; returns the whole ``(B, S, H, K)`` cache.

        The first call (from :func:`flaxlm.tools.generate.init_cache`, with S tokens) only
        creates the cache variables with that shape.
        """
        ready = self.has_variable("cache", "cached_key")
        key = self.variable("cache", "cached_key", jnp.zeros, k_BxLxHxK.shape, k_BxLxHxK.dtype)
        value = self.variable("cache", "cached_value", jnp.zeros, v_BxLxHxK.shape, v_BxLxHxK.dtype)
        if not ready:
            return k_BxLxHxK, v_BxLxHxK
        at = (0, index, 0, 0)
        key.value = jax.lax.dynamic_update_slice(key.value, k_BxLxHxK.astype(key.value.dtype), at)
        value.value = jax.lax.dynamic_update_slice(
            value.value, v_BxLxHxK.astype(value.value.dtype), at
        )
        return key.value, value.value


class MLP(nn.Module):
    """Position-wise feed-forward: D -> F -> activation -> D. With ``swiglu`` the MLP is
    gated (Llama): ``silu(x W_gate) * (x W_up)``, then ``W_down``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        # The projections' outputs are stored in the compute dtype (bf16 under mixed
        # precision, as MaxText keeps them): at 65,536 tokens per chip a float32 B x L x F is
        # 3.5 GiB. The activation reads them in float32 (the fused SwiGLU / GELU below).
        up = Dense(cfg, (cfg.d_ff,), ("embed", "mlp"), ("mlp",), name="up")(x_BxLxD)
        h_BxLxF = checkpoint_name(up.astype(dtype), "mlp_up")
        if cfg.activation == "swiglu":
            gate = Dense(cfg, (cfg.d_ff,), ("embed", "mlp"), ("mlp",), name="gate")(x_BxLxD)
            gate = checkpoint_name(gate.astype(dtype), "mlp_gate")
            h_BxLxF = swiglu(gate, h_BxLxF)
        else:
            act = activation_fn(cfg.activation, use_custom_backward(cfg))
            h_BxLxF = act(h_BxLxF).astype(dtype)
        h_BxLxF = constrain(h_BxLxF, "act_batch", "act_length", "act_mlp")
        h_BxLxF = checkpoint_name(h_BxLxF, "mlp_hidden")  # the down projection's input
        down = Dense(
            cfg, (cfg.d_model,), ("mlp", "embed"), ("embed",), std=residual_std(cfg), name="down"
        )
        return down(h_BxLxF).astype(dtype)


class Block(nn.Module):
    """One transformer block, shared by decoder and encoder.

    ``norm_placement="pre"`` (GPT-2): ``x + attn(LN(x))``, ``x + mlp(LN(x))``; the model adds
    a final LayerNorm. ``"post"`` (original Transformer / BERT): ``LN(x + attn(x))``,
    ``LN(x + mlp(x))``. Dropout (rng stream "dropout") is applied to each sublayer's output
    before it joins the residual stream.
    """

    cfg: ModelConfig
    norm_placement: str = "pre"
    causal: bool = False  # GPT: its masks are causal (lets attention skip masked blocks)
    moe: bool = False  # the MLP is a Mixture-of-Experts (flaxlm/models/moe.py)

    @nn.compact
    def __call__(
        self,
        x_BxLxD: Array,
        mask: Mask,
        positions_BxL: Array,
        deterministic: bool = True,
        cache_index: Array | None = None,
    ) -> Array:
        """``cache_index``: decode with the attention KV cache (see :class:`Attention`)."""
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(
                f"norm_placement={self.norm_placement!r} is not one of {NORM_PLACEMENTS}"
            )
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        attn = Attention(cfg, self.causal, name="attn")
        mlp = MoEMLP(cfg, name="mlp") if self.moe else MLP(cfg, name="mlp")
        ln_attn, ln_mlp = layer_norm(cfg, name="ln_attn"), layer_norm(cfg, name="ln_mlp")
        drop = nn.Dropout(rate=cfg.dropout, deterministic=deterministic)

        if self.norm_placement == "pre":
            h = attn(ln_attn(x_BxLxD).astype(dtype), mask, positions_BxL, cache_index)
            x_BxLxD = x_BxLxD + drop(h)
            x_BxLxD = x_BxLxD + drop(mlp(ln_mlp(x_BxLxD).astype(dtype)))
        else:
            h = attn(x_BxLxD, mask, positions_BxL, cache_index)
            x_BxLxD = ln_attn(x_BxLxD + drop(h)).astype(dtype)
            x_BxLxD = ln_mlp(x_BxLxD + drop(mlp(x_BxLxD))).astype(dtype)
        return constrain(x_BxLxD, "act_batch", "act_length", "act_embed")
