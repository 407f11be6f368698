"""Matmul parameters a token runs through in a block's parts: what the FLOP counts of the
families build on (PaLM / MaxText convention: training FLOPs = 6 x these per token, plus the
attention score and value matmuls; flaxlm/train/flops.py, flaxlm/families/t5.py)."""

from __future__ import annotations

from flaxlm.config import ModelConfig
from flaxlm.models.moe import is_moe_layer


def attention_params(cfg: ModelConfig) -> int:
    """Query and output ``2 d^2``, key and value ``2 d d_kv`` (``d_kv = d n_kv_heads /
    n_heads``: the key/value width under grouped-query attention)."""
    d = cfg.d_model
    d_kv = d * (cfg.n_kv_heads or cfg.n_heads) // cfg.n_heads
    return 2 * d * d + 2 * d * d_kv


def mlp_params(cfg: ModelConfig, layer: int, gated: bool) -> int:
    """The feed-forward of block ``layer``: ``M d F`` (``M`` = 3 ``gated``, else 2), or in a
    Mixture-of-Experts block the *active* experts only: ``top_k`` routed plus the shared
    ones, each ``M' d F_e`` (``F_e`` = ``moe.d_expert`` or ``d_ff``; experts gate only with
    swiglu), and the router ``d E``. Tokens a capacity limit drops still count (an upper
    bound when ``capacity_factor`` > 0)."""
    d = cfg.d_model
    if not is_moe_layer(cfg, layer):
        return (3 if gated else 2) * d * cfg.d_ff
    moe = cfg.moe
    expert = (3 if cfg.activation == "swiglu" else 2) * d * (moe.d_expert or cfg.d_ff)
    return (moe.top_k + moe.shared_experts) * expert + d * moe.num_experts
