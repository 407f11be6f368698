"""GPT: a pre-LN transformer decoder with an LM head (GPT-2 layout).

    model = GPT(cfg)
    params = model.init(jax.random.key(0), tokens_BxL)["params"]
    logits_BxLxV = model.apply({"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL)
    # training: deterministic=False, rngs={"dropout": key}

Packed rows: ``segment_ids`` name the document of each token (attention never crosses
documents) and ``positions`` restart at 0 at each document start.

Decoding with a KV cache (``flaxlm.tools.generate``): ``decode=True`` with a "cache"
collection from ``init_cache`` appends the given tokens to the cache and returns their logits:

    logits, vars = model.apply({"params": p, "cache": c}, tok_BxT, pos_BxT, seg_BxT,
                               decode=True, mutable=["cache"])
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxlm.config import ModelConfig
from flaxlm.models import layer_stack, layers
from flaxlm.models.context_parallel import context_size, load_balance, restore_order
from flaxlm.models.layers import Array, constrain
from flaxlm.models.masks import Mask
from flaxlm.models.moe import is_moe_layer

POSITIONS = ("learned", "sinusoidal", "rope")


class GPT(nn.Module):
    """Decoder-only LM. Param tree: ``token_embed``, ``position_embed`` (learned only),
    ``blocks_{i}`` (``ln_attn``, ``attn/{query,key,value,out}``, ``ln_mlp``, ``mlp/{up,down}``),
    ``ln_final``, ``lm_head`` (untied only)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BxL: Array,
        positions_BxL: Array | None = None,
        segment_ids_BxL: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        return_hidden: bool = False,
    ) -> Array:
        """Args: int32 ``tokens_BxL``; optional int32 ``positions_BxL`` (default 0..L-1) and
        ``segment_ids_BxL`` (default all ones: one document per row). ``decode``: append the
        tokens to the KV cache (mutable "cache" collection) and attend over all of it.

        Returns: float32 ``logits_BxLxV``; with ``return_hidden`` the final hidden states
        ``x_BxLxD`` (after ``ln_final``, in the compute dtype) instead, for a caller that runs
        the head itself (:func:`flaxlm.losses.head_loss.fused_lm_loss`).
        """
        cfg = self.cfg
        if cfg.positions not in POSITIONS:
            raise ValueError(f"positions={cfg.positions!r} is not one of {POSITIONS}")
        dtype = layers.dtype_of(cfg.dtype)
        batch, length = tokens_BxL.shape
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones((batch, length), dtype=jnp.int32)
        # mesh.context > 1: rows in the load-balanced order (flaxlm/models/context_parallel.py)
        shards = 1 if decode else context_size()
        tokens_BxL, positions_BxL, segment_ids_BxL = (
            load_balance(a, shards) for a in (tokens_BxL, positions_BxL, segment_ids_BxL)
        )

        embed = layers.token_embed(cfg)
        x_BxLxD = embed(tokens_BxL)
        if cfg.positions == "learned":
            x_BxLxD = x_BxLxD + layers.position_embed(cfg)(positions_BxL)
        elif cfg.positions == "sinusoidal":
            x_BxLxD = x_BxLxD + layers.sinusoidal_embedding(positions_BxL, cfg.d_model)
        # rope: positions enter inside attention, on q and k.
        x_BxLxD = x_BxLxD.astype(dtype)
        x_BxLxD = nn.Dropout(rate=cfg.dropout, deterministic=deterministic)(x_BxLxD)
        x_BxLxD = constrain(x_BxLxD, "act_batch", "act_length", "act_embed")

        if decode:
            mask, cache_index = self._decode_mask(segment_ids_BxL)
        else:
            mask, cache_index = Mask.causal_segments(segment_ids_BxL), None
        if cfg.scan_layers:
            stack = layer_stack.ScannedBlocks(cfg, "pre", deterministic, causal=True, name="blocks")
            x_BxLxD = stack(x_BxLxD, mask, positions_BxL, cache_index)
        else:
            block_cls = layer_stack.remat_block(cfg)
            for i in range(cfg.n_layers):
                block = block_cls(
                    cfg, "pre", causal=True, moe=is_moe_layer(cfg, i), name=f"blocks_{i}"
                )
                x_BxLxD = block(x_BxLxD, mask, positions_BxL, deterministic, cache_index)

        x_BxLxD = layers.layer_norm(cfg, name="ln_final")(x_BxLxD).astype(dtype)
        x_BxLxD = restore_order(x_BxLxD, shards)
        if return_hidden and not self.is_initializing():
            return constrain(x_BxLxD, "act_batch", "act_length", "act_embed")
        if cfg.tie_embeddings:
            logits_BxLxV = embed.attend(x_BxLxD)
        else:
            # No bias, as GPT-2's head.
            head = layers.Dense(
                cfg, (cfg.vocab_size,), ("embed", "vocab"), (), use_bias=False, name="lm_head"
            )
            logits_BxLxV = head(x_BxLxD)
        logits_BxLxV = logits_BxLxV.astype(jnp.float32)
        return constrain(logits_BxLxV, "act_batch", "act_length", "act_vocab")

    def _decode_mask(self, segment_ids_BxL: Array) -> tuple[Mask, Array]:
        """The cache's write index and the mask of L new tokens over S cache slots
        (:meth:`Mask.decode`). Advances the index by L."""
        ready = self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        segments = self.variable(
            "cache", "segment_ids", jnp.zeros, segment_ids_BxL.shape, jnp.int32
        )
        if not ready:  # creating the cache: only shapes matter
            return Mask.causal_segments(segment_ids_BxL), index.value
        start = index.value
        segments.value = jax.lax.dynamic_update_slice(
            segments.value, segment_ids_BxL.astype(jnp.int32), (0, start)
        )
        index.value = start + segment_ids_BxL.shape[1]
        return Mask.decode(segment_ids_BxL, segments.value, start), start


def _inner(params) -> dict:
    """Accepts ``{"params": ...}`` or the params dict itself, boxed or not."""
    params = nn.meta.unbox(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        return params["params"]
    return params


def count_params(params) -> int:
    """Total number of parameters; works on arrays, boxed arrays and ``jax.eval_shape`` output."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(_inner(params)))


def non_embedding_params(params, cfg: ModelConfig) -> int:
    """Parameters minus the lookup tables (token and learned position embeddings), as in
    Kaplan et al. An untied ``lm_head`` is a matmul and is counted."""
    inner = _inner(params)
    lookups = count_params(inner["token_embed"])
    if "position_embed" in inner:
        lookups += count_params(inner["position_embed"])
    return count_params(inner) - lookups
