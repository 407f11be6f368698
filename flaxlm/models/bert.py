"""BERT: a bidirectional transformer encoder with pooler, MLM and NSP heads.

    model = BERT(cfg)                      # a ModelConfig; the "bert" family builds it
    params = model.init(jax.random.key(0), tokens_BxL)["params"]
    out = model.apply({"params": params}, tokens_BxL, token_types_BxL=types_BxL,
                      masked_positions_BxP=pos_BxP)
    out["mlm_logits"]   # (B, P, V): the vocabulary projection runs only at the P gathered
                        # positions (~15 % of the tokens), not at all L
    out["nsp_logits"]   # (B, 2): 0 = B follows A, 1 = B is a random segment
    pooled_BxD = model.apply({"params": params}, tokens_BxL, method=BERT.pooled)

Without ``masked_positions_BxP`` the MLM head runs at every position (what the unified
objective's causal and prefix-LM rows need). ``prefix_len_B`` switches the attention mask per
row: ``None`` (bidirectional over each segment), 0 (causal), p (bidirectional over the first p
tokens, causal after) — see :meth:`flaxlm.models.masks.Mask.prefix_lm`.

Param tree, named after HuggingFace ``BertForPreTraining`` where it has a counterpart:
``token_embed`` (word_embeddings), ``position_embed`` (position_embeddings; learned only),
``type_embed`` (token_type_embeddings), ``ln_embed`` (embeddings.LayerNorm),
``blocks_{i}`` (``attn/{query,key,value,out}``, ``ln_attn`` = attention.output.LayerNorm,
``mlp/{up,down}`` = intermediate / output.dense, ``ln_mlp`` = output.LayerNorm),
``ln_final`` (pre-LN only), ``pooler`` (pooler.dense), ``mlm_transform`` + ``mlm_ln``
(cls.predictions.transform), ``mlm_bias`` (cls.predictions.bias; the decoder is tied to
``token_embed``), ``nsp_head`` (cls.seq_relationship).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from flaxlm.config import ModelConfig
from flaxlm.models import layers
from flaxlm.models.backward import use_custom_backward
from flaxlm.models.layers import Array, constrain
from flaxlm.models.masks import Mask
from flaxlm.models.moe import is_moe_layer

POSITIONS = ("learned", "sinusoidal")


class BERT(nn.Module):
    """Encoder + heads. ``cfg.norm_placement``: ``post`` (original BERT: LN after each residual
    add, LN on the embeddings) or ``pre`` (LN inside each branch, plus ``ln_final``)."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.positions not in POSITIONS:
            raise ValueError(f"BERT positions={cfg.positions!r} is not one of {POSITIONS}")
        self.token_embed = layers.token_embed(cfg)
        if cfg.positions == "learned":
            self.position_embed = layers.position_embed(cfg)
        self.type_embed = nn.Embed(
            num_embeddings=cfg.type_vocab_size,
            features=cfg.d_model,
            dtype=layers.dtype_of(cfg.dtype),
            param_dtype=layers.dtype_of(cfg.param_dtype),
            embedding_init=layers.normal_init(cfg.init_std, ("types", "embed")),
        )
        self.ln_embed = layers.layer_norm(cfg)
        self.blocks = [
            layers.Block(cfg, norm_placement=cfg.norm_placement, moe=is_moe_layer(cfg, i))
            for i in range(cfg.n_layers)
        ]
        if cfg.norm_placement == "pre":
            self.ln_final = layers.layer_norm(cfg)
        self.pooler = layers.Dense(cfg, (cfg.d_model,), ("embed", "embed_out"), ("embed_out",))
        self.mlm_transform = layers.Dense(
            cfg, (cfg.d_model,), ("embed", "embed_out"), ("embed_out",)
        )
        self.mlm_ln = layers.layer_norm(cfg)
        self.mlm_bias = self.param(
            "mlm_bias",
            layers.zeros_init(("vocab",)),
            (cfg.vocab_size,),
            layers.dtype_of(cfg.param_dtype),
        )
        self.nsp_head = layers.Dense(cfg, (2,), ("embed", "classes"), ("classes",))
        self.dropout = nn.Dropout(rate=cfg.dropout)

    def encode(
        self,
        tokens_BxL: Array,
        positions_BxL: Array | None = None,
        segment_ids_BxL: Array | None = None,
        token_types_BxL: Array | None = None,
        prefix_len_B: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """The encoder's output ``x_BxLxD``. ``segment_ids`` (default all ones) isolate packed
        documents and padding (segment 0) in attention; ``token_types`` (default 0) are
        BERT's sentence A / B ids."""
        cfg = self.cfg
        dtype = layers.dtype_of(cfg.dtype)
        batch, length = tokens_BxL.shape
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones((batch, length), jnp.int32)
        if token_types_BxL is None:
            token_types_BxL = jnp.zeros((batch, length), jnp.int32)

        x_BxLxD = self.token_embed(tokens_BxL) + self.type_embed(token_types_BxL)
        if cfg.positions == "learned":
            x_BxLxD = x_BxLxD + self.position_embed(positions_BxL)
        else:
            x_BxLxD = x_BxLxD + layers.sinusoidal_embedding(positions_BxL, cfg.d_model)
        x_BxLxD = self.ln_embed(x_BxLxD).astype(dtype)
        x_BxLxD = self.dropout(x_BxLxD, deterministic=deterministic)
        x_BxLxD = constrain(x_BxLxD, "act_batch", "act_length", "act_embed")

        if prefix_len_B is None:
            mask = Mask.segments(segment_ids_BxL)
        else:
            mask = Mask.prefix_lm(segment_ids_BxL, prefix_len_B)
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD, mask, positions_BxL, deterministic)
        if cfg.norm_placement == "pre":
            x_BxLxD = self.ln_final(x_BxLxD).astype(dtype)
        return x_BxLxD

    def mlm_logits(self, x_BxLxD: Array, masked_positions_BxP: Array | None = None) -> Array:
        """MLM head (dense, activation, LayerNorm, tied decoder + bias) at the gathered
        positions: float32 ``logits_BxPxV`` (all L positions when none are given)."""
        cfg = self.cfg
        dtype = layers.dtype_of(cfg.dtype)
        if masked_positions_BxP is not None:
            x_BxLxD = jnp.take_along_axis(x_BxLxD, masked_positions_BxP[..., None], axis=1)
        activation = layers.activation_fn(cfg.activation, use_custom_backward(cfg))
        h_BxPxD = activation(self.mlm_transform(x_BxLxD))
        h_BxPxD = self.mlm_ln(h_BxPxD).astype(dtype)
        logits_BxPxV = self.token_embed.attend(h_BxPxD) + self.mlm_bias.astype(jnp.float32)
        return constrain(logits_BxPxV, "act_batch", "act_length", "act_vocab")

    def pool(self, x_BxLxD: Array) -> Array:
        """Pooler: dense + tanh on the first ([CLS]) token -> float32 ``pooled_BxD``."""
        return jnp.tanh(self.pooler(x_BxLxD[:, 0]))

    def pooled(
        self,
        tokens_BxL: Array,
        segment_ids_BxL: Array | None = None,
        token_types_BxL: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Encoder + pooler: the [CLS] sentence vector ``pooled_BxD`` (fine-tuning)."""
        x_BxLxD = self.encode(
            tokens_BxL, None, segment_ids_BxL, token_types_BxL, None, deterministic
        )
        return self.pool(x_BxLxD)

    def __call__(
        self,
        tokens_BxL: Array,
        positions_BxL: Array | None = None,
        segment_ids_BxL: Array | None = None,
        token_types_BxL: Array | None = None,
        masked_positions_BxP: Array | None = None,
        prefix_len_B: Array | None = None,
        deterministic: bool = True,
        with_nsp: bool = True,
    ) -> dict[str, Array]:
        """Returns ``{"mlm_logits": (B, P, V), "nsp_logits": (B, 2)}`` (float32); the NSP
        head (and pooler) are skipped when ``with_nsp`` is False."""
        x_BxLxD = self.encode(
            tokens_BxL, positions_BxL, segment_ids_BxL, token_types_BxL, prefix_len_B,
            deterministic,
        )  # fmt: skip
        out = {"mlm_logits": self.mlm_logits(x_BxLxD, masked_positions_BxP)}
        if with_nsp:
            out["nsp_logits"] = self.nsp_head(self.pool(x_BxLxD))
        return out
