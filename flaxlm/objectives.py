"""Training objectives. Each returns a *summed* loss plus metrics, so callers can add up
micro-batches and divide once by the total number of predicted tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_lm_loss(
    logits_BxLxV: jax.Array,
    targets_BxL: jax.Array,
    loss_mask_BxL: jax.Array,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    source_ids_BxL: jax.Array | None = None,
    n_sources: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy, summed over the positions where ``loss_mask`` is 1.

    Works on the float32 logits directly: the per-token loss is ``logsumexp - logit[target]``,
    so no second ``B x L x V`` array (a log-softmax) is materialised. Label smoothing mixes in
    the uniform distribution: ``(1 - eps) * CE + eps * (logsumexp - mean(logits))``. The z-loss
    ``z * logsumexp**2`` keeps the softmax normaliser near 1 (PaLM).

    Returns:
      (objective_sum, metrics) where metrics holds summed ``ce_sum`` (plain cross-entropy,
      what we report as loss), ``correct`` and ``n_tokens``; with ``source_ids_BxL`` (a data
      mixture) also ``source_ce_sum`` and ``source_tokens``, each ``(n_sources,)``.
    """
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    mask_BxL = loss_mask_BxL.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    ce_BxL = lse_BxL - target_logit_BxL
    objective_BxL = ce_BxL
    if label_smoothing:
        smooth_BxL = lse_BxL - jnp.mean(logits_BxLxV, axis=-1)
        objective_BxL = (1.0 - label_smoothing) * ce_BxL + label_smoothing * smooth_BxL
    if z_loss:
        objective_BxL = objective_BxL + z_loss * jnp.square(lse_BxL)
    correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
    metrics = {
        "ce_sum": jnp.sum(ce_BxL * mask_BxL),
        "correct": jnp.sum(correct_BxL * mask_BxL),
        "n_tokens": jnp.sum(mask_BxL),
    }
    if source_ids_BxL is not None:
        ids = source_ids_BxL.reshape(-1)
        metrics["source_ce_sum"] = jax.ops.segment_sum(
            (ce_BxL * mask_BxL).reshape(-1), ids, num_segments=n_sources
        )
        metrics["source_tokens"] = jax.ops.segment_sum(
            mask_BxL.reshape(-1), ids, num_segments=n_sources
        )
    return jnp.sum(objective_BxL * mask_BxL), metrics
