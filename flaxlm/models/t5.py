"""T5: an encoder–decoder transformer with a relative position bias (Raffel et al.).

    model = T5(cfg)                      # cfg.family == "t5"; T5-specific keys: cfg.t5
    params = model.init(jax.random.key(0), encoder_ids_BxS)["params"]
    logits_BxLxV = model.apply({"params": params}, encoder_ids_BxS, decoder_input_ids_BxL,
                               encoder_segment_ids_BxS, decoder_segment_ids_BxL,
                               encoder_positions_BxS, decoder_positions_BxL)

Packed rows: segment j of a decoder row reads segment j of its encoder row (cross-attention
compares segment ids on both sides; 0 = padding), and positions restart at 0 in each segment
(they feed the relative position bias). Cached decoding, one token at a time:
flaxlm/models/t5_decode.py (``encode``, ``init_cache``, ``decode_step``).

Options (``model.t5``, :class:`T5Options`, plus the shared model keys): T5 v1.1 is
``gated_mlp: true``, ``activation: gelu``, ``tie_embeddings: false``; the original T5 is
``gated_mlp: false``, ``activation: relu``, ``tie_embeddings: true`` (the tied head's input
is scaled by ``d_model^-1/2``). Both use RMSNorm pre-norm blocks and no biases
(``model.norm: rmsnorm``, ``model.use_bias: false``; the family checks them).
Param tree: ``token_embed`` (shared by encoder, decoder and a tied head), ``encoder`` and
``decoder`` (each ``relative_bias``, ``blocks_{i}``, ``ln_final``), ``lm_head`` (untied).
With ``model.scan_layers`` each stack's blocks are one ``nn.scan`` (``layers/block/...``, the
parameters stacked on a leading ``layers`` axis; flaxlm/models/t5_blocks.py
``scanned_layers``): one block compiled per stack whatever the depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxlm.config import ModelConfig
from flaxlm.models import layers
from flaxlm.models.layer_stack import remat_policy
from flaxlm.models.layers import Array, constrain, dtype_of
from flaxlm.models.masks import Mask
from flaxlm.models.moe import is_moe_layer
from flaxlm.models.t5_attention import RelativeBias
from flaxlm.models.t5_blocks import T5Block, scanned_layers


@dataclass(unsafe_hash=True)  # under ``model``: hashable, as ModelConfig
class T5Options:
    """The ``model.t5`` config section (registered by the ``t5`` family entry)."""

    decoder_layers: int = 0  # 0 = model.n_layers
    relative_buckets: int = 32  # buckets of the relative position bias (per stack)
    relative_max_distance: int = 128  # offsets beyond this share the last bucket
    gated_mlp: bool = True  # v1.1: act(x W_gate) * (x W_up); false: act(x W_up) (original)


def decoder_layers(cfg: ModelConfig) -> int:
    return cfg.t5.decoder_layers or cfg.n_layers


def default_positions(ids_BxL: Array) -> Array:
    batch, length = ids_BxL.shape
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


class T5Stack(nn.Module):
    """The encoder (bidirectional bias, no cross-attention) or the decoder."""

    cfg: ModelConfig
    decoder: bool = False

    def setup(self) -> None:
        cfg = self.cfg
        n = decoder_layers(cfg) if self.decoder else cfg.n_layers
        if cfg.scan_layers:
            self.layers = scanned_layers(cfg, self.decoder, n, name="layers")
        else:
            block = T5Block
            if cfg.remat != "none":
                block = nn.remat(T5Block, policy=remat_policy(cfg), static_argnums=(5,))
            self.blocks = [block(cfg, self.decoder, is_moe_layer(cfg, i)) for i in range(n)]
        self.relative_bias = RelativeBias(
            cfg.n_heads, cfg.t5.relative_buckets, cfg.t5.relative_max_distance,
            bidirectional=not self.decoder, param_dtype=dtype_of(cfg.param_dtype),
            std=cfg.init_std,
        )  # fmt: skip
        self.ln_final = layers.layer_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def __call__(
        self,
        x_BxLxD: Array,
        segment_ids_BxL: Array,
        positions_BxL: Array,
        cross: tuple[Array, Array] | None = None,
        deterministic: bool = True,
    ) -> Array:
        """``x`` embedded; ``cross`` (decoder): the encoder's output and segment ids."""
        x_BxLxD = self.drop(x_BxLxD, deterministic=deterministic)
        bias_BxHxLxL = self.relative_bias(positions_BxL, positions_BxL)
        if self.decoder:
            mask = Mask.causal_segments(segment_ids_BxL)
            encoded_BxSxD, enc_segments_BxS = cross
            cross_mask = Mask(segment_ids_BxL, enc_segments_BxS)
        else:
            mask = Mask.segments(segment_ids_BxL)
        if self.cfg.scan_layers:
            context = (mask, bias_BxHxLxL, (encoded_BxSxD, cross_mask) if self.decoder else None)
            x_BxLxD, _ = self.layers(x_BxLxD, None, context, deterministic)
        else:
            for block in self.blocks:
                block_cross = None
                if self.decoder:
                    block_cross = (block.cross_kv(encoded_BxSxD), cross_mask)
                x_BxLxD = block(x_BxLxD, mask, bias_BxHxLxL, block_cross, deterministic)
        x_BxLxD = self.ln_final(x_BxLxD).astype(dtype_of(self.cfg.dtype))
        return self.drop(x_BxLxD, deterministic=deterministic)

    def cross_kv(self, encoded_BxSxD: Array) -> list[tuple[Array, Array]] | tuple[Array, Array]:
        """Each decoder block's cross-attention keys and values of ``encoded``: a list of
        ``(B, S, N, K)`` pairs, or with ``scan_layers`` one pair ``(B, layers, S, N, K)``."""
        if self.cfg.scan_layers:
            return self.layers.cross_kv(None, None, encoded_BxSxD, True)[1]
        return [block.cross_kv(encoded_BxSxD) for block in self.blocks]

    def step(
        self, x_Bx1xD: Array, caches: list[dict] | dict, index: Array, enc_segments_BxS: Array
    ) -> tuple[Array, list[dict] | dict]:
        """One token per row at decoder position ``index`` over the caches (decoder): one
        dict per block, or with ``scan_layers`` one dict with the layers on axis 1."""
        scanned = self.cfg.scan_layers
        batch = x_Bx1xD.shape[0]
        slots = (caches if scanned else caches[0])["key"].shape[2 if scanned else 1]
        ones_Bx1 = jnp.ones((batch, 1), jnp.int32)
        mask = Mask(
            ones_Bx1, jnp.ones((batch, slots), jnp.int32), query_offset=index, causal=True,
            decoding=True,
        )  # fmt: skip
        cross_mask = Mask(ones_Bx1, (enc_segments_BxS > 0).astype(jnp.int32), decoding=True)
        q_pos_Bx1 = jnp.full((batch, 1), index, jnp.int32)
        bias_BxHx1xT = self.relative_bias(q_pos_Bx1, default_positions(mask.kv_segment_ids_BxS))
        if scanned:
            context = (index, mask, bias_BxHx1xT, cross_mask)
            x_Bx1xD, caches = self.layers.step(x_Bx1xD, caches, context, True)
            return self.ln_final(x_Bx1xD).astype(dtype_of(self.cfg.dtype)), caches
        new_caches = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x_Bx1xD, cache = block.step(x_Bx1xD, cache, index, mask, bias_BxHx1xT, cross_mask)
            new_caches.append(cache)
        return self.ln_final(x_Bx1xD).astype(dtype_of(self.cfg.dtype)), new_caches


class T5(nn.Module):
    """Encoder–decoder LM (see the module doc). ``__call__`` scores a batch (teacher forcing);
    ``encode``, ``decoder_kv`` and ``step`` are the pieces of cached decoding."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.token_embed = layers.token_embed(cfg)
        self.encoder = T5Stack(cfg, decoder=False)
        self.decoder = T5Stack(cfg, decoder=True)
        if not cfg.tie_embeddings:
            self.lm_head = layers.Dense(
                cfg, (cfg.vocab_size,), ("embed", "vocab"), (), use_bias=False
            )

    def __call__(
        self,
        encoder_ids_BxS: Array,
        decoder_input_ids_BxL: Array | None = None,
        encoder_segment_ids_BxS: Array | None = None,
        decoder_segment_ids_BxL: Array | None = None,
        encoder_positions_BxS: Array | None = None,
        decoder_positions_BxL: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """float32 ``logits_BxLxV`` of every decoder position. Defaults: one segment per row,
        positions ``0..``; no decoder ids = the encoder ids (what ``init`` needs)."""
        if decoder_input_ids_BxL is None:
            decoder_input_ids_BxL = encoder_ids_BxS
        if encoder_segment_ids_BxS is None:
            encoder_segment_ids_BxS = jnp.ones(encoder_ids_BxS.shape, jnp.int32)
        if decoder_segment_ids_BxL is None:
            decoder_segment_ids_BxL = jnp.ones(decoder_input_ids_BxL.shape, jnp.int32)
        encoded_BxSxD = self.encode(
            encoder_ids_BxS, encoder_segment_ids_BxS, encoder_positions_BxS, deterministic
        )
        if decoder_positions_BxL is None:
            decoder_positions_BxL = default_positions(decoder_input_ids_BxL)
        x_BxLxD = self._embed(decoder_input_ids_BxL)
        cross = (encoded_BxSxD, encoder_segment_ids_BxS)
        x_BxLxD = self.decoder(
            x_BxLxD, decoder_segment_ids_BxL, decoder_positions_BxL, cross, deterministic
        )
        return self.head(x_BxLxD)

    def _embed(self, ids_BxL: Array) -> Array:
        x_BxLxD = self.token_embed(ids_BxL).astype(dtype_of(self.cfg.dtype))
        return constrain(x_BxLxD, "act_batch", "act_length", "act_embed")

    def encode(
        self,
        encoder_ids_BxS: Array,
        encoder_segment_ids_BxS: Array,
        encoder_positions_BxS: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """The encoder's output ``encoded_BxSxD`` (compute dtype)."""
        if encoder_positions_BxS is None:
            encoder_positions_BxS = default_positions(encoder_ids_BxS)
        x_BxSxD = self._embed(encoder_ids_BxS)
        return self.encoder(
            x_BxSxD, encoder_segment_ids_BxS, encoder_positions_BxS, None, deterministic
        )

    def head(self, x_BxLxD: Array) -> Array:
        """float32 logits; the tied head (original T5) scales its input by d_model^-1/2."""
        if self.cfg.tie_embeddings:
            x_BxLxD = x_BxLxD * jnp.asarray(self.cfg.d_model**-0.5, x_BxLxD.dtype)
            logits_BxLxV = self.token_embed.attend(x_BxLxD)
        else:
            logits_BxLxV = self.lm_head(x_BxLxD)
        logits_BxLxV = logits_BxLxV.astype(jnp.float32)
        return constrain(logits_BxLxV, "act_batch", "act_length", "act_vocab")

    def decoder_kv(self, encoded_BxSxD: Array) -> list[tuple[Array, Array]]:
        """Every decoder block's cross-attention keys and values (computed once per prompt)."""
        return self.decoder.cross_kv(encoded_BxSxD)

    def step(
        self, token_B: Array, caches: list[dict], index: Array, enc_segments_BxS: Array
    ) -> tuple[Array, list[dict]]:
        """``logits_BxV`` of the next token after ``token_B`` at decoder position ``index``."""
        x_Bx1xD = self._embed(token_B[:, None])
        x_Bx1xD, caches = self.decoder.step(x_Bx1xD, caches, index, enc_segments_BxS)
        return self.head(x_Bx1xD)[:, 0], caches


def count_params(params) -> int:
    """Total number of parameters (arrays, boxed arrays or ``jax.eval_shape`` output)."""
    return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params)))
