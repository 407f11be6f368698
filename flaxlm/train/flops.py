"""Model FLOPs and the machine's matmul peak, for MFU (model-FLOPs utilisation)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.config import ModelConfig
from flaxlm.models.moe import is_moe_layer


def flops_per_token(cfg: ModelConfig, seq_len: int, include_head: bool = True) -> float:
    """Training FLOPs per token: ``6 * N + 12 * L * d * S`` (Kaplan et al. / PaLM appendix B).

    ``N`` counts the non-embedding matmul parameters of the blocks: attention ``2·d² + 2·d·d_kv``
    (queries and output, keys and values; ``d_kv = d · n_kv_heads / n_heads``, so 4·d² without
    GQA), MLP ``2·d·f`` (``3·d·f`` gated, swiglu) per layer; ``12·L·d·S`` is the attention score
    and value matmuls (forward + backward). ``include_head`` adds the LM-head matmul,
    ``6 * d * V``, which dominates small models.

    Mixture-of-Experts blocks count their *active* parameters: each token runs ``top_k`` of
    the ``E`` expert MLPs (``top_k * M·d·f``) plus the router (``d·E``); tokens a capacity
    limit drops are still counted (an upper bound when ``capacity_factor`` > 0).
    """
    d, f, n_layers = cfg.d_model, cfg.d_ff, cfg.n_layers
    d_kv = d * (cfg.n_kv_heads or cfg.n_heads) // cfg.n_heads
    mlp = (3 if cfg.activation == "swiglu" else 2) * d * f
    moe_layers = sum(is_moe_layer(cfg, i) for i in range(n_layers))
    active_mlp = (n_layers - moe_layers) * mlp
    active_mlp += moe_layers * (cfg.moe.top_k * mlp + d * cfg.moe.num_experts)
    n_block = n_layers * (2 * d * d + 2 * d * d_kv) + active_mlp
    flops = 6.0 * n_block + 12.0 * n_layers * d * seq_len
    if include_head:
        flops += 6.0 * d * cfg.vocab_size
    return flops


def measure_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Median FLOP/s of a jitted float32 ``n x n`` matmul on the default device."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32)
    b = jax.random.normal(key_b, (n, n), jnp.float32)
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / float(np.median(times))
