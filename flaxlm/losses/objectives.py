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
    mask_BxL = loss_mask_BxL.astype(jnp.float32)
    ce_BxL, objective_BxL, correct_BxL = token_losses(
        logits_BxLxV, targets_BxL, label_smoothing, z_loss
    )
    metrics = lm_metrics(ce_BxL, correct_BxL, mask_BxL, source_ids_BxL, n_sources)
    return jnp.sum(objective_BxL * mask_BxL), metrics


def lm_metrics(
    ce_BxL: jax.Array,
    correct_BxL: jax.Array,
    loss_mask_BxL: jax.Array,
    source_ids_BxL: jax.Array | None = None,
    n_sources: int = 0,
) -> dict[str, jax.Array]:
    """The summed metrics of :func:`causal_lm_loss` from per-token cross-entropy and
    correctness (shared with the chunked head, flaxlm/losses/head_loss.py)."""
    mask_BxL = loss_mask_BxL.astype(jnp.float32)
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
    return metrics


def token_losses(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, label_smoothing: float, z_loss: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token ``(ce_BxL, objective_BxL, correct_BxL)`` (float32): plain cross-entropy, the
    trained objective (label smoothing, z-loss), and whether the argmax is the target."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    ce_BxL = lse_BxL - target_logit_BxL
    objective_BxL = ce_BxL
    if label_smoothing:
        smooth_BxL = lse_BxL - jnp.mean(logits_BxLxV, axis=-1)
        objective_BxL = (1.0 - label_smoothing) * ce_BxL + label_smoothing * smooth_BxL
    if z_loss:
        objective_BxL = objective_BxL + z_loss * jnp.square(lse_BxL)
    # "The target holds the largest logit": one max-reduction over V, which XLA fuses with the
    # logsumexp's, where an argmax is a second (iota, value) reduction pass (~3 % of a CPU
    # step). It differs from argmax only on exact ties.
    max_BxL = jnp.max(logits_BxLxV, axis=-1)
    correct_BxL = (target_logit_BxL >= max_BxL).astype(jnp.float32)
    return ce_BxL, objective_BxL, correct_BxL


def mlm_loss(
    logits_BxPxV: jax.Array,
    masked_ids_BxP: jax.Array,
    masked_weights_BxP: jax.Array,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked-LM cross-entropy on the logits of the P *gathered* masked positions, summed over
    real predictions (``masked_weights`` 1; 0 pads rows with fewer than P predictions).

    Returns (objective_sum, {``ce_sum``, ``correct``, ``n_tokens``}) like
    :func:`causal_lm_loss`; the caller divides by the batch's total ``n_tokens``.
    """
    return causal_lm_loss(logits_BxPxV, masked_ids_BxP, masked_weights_BxP, label_smoothing, z_loss)


def nsp_loss(
    logits_Bx2: jax.Array, labels_B: jax.Array, weights_B: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-sentence prediction cross-entropy (label 0: B follows A, 1: B is random), summed
    over rows with weight 1. Returns (ce_sum, {``ce_sum``, ``correct``, ``n_examples``})."""
    ce_B, _, correct_B = token_losses(logits_Bx2[:, None], labels_B[:, None], 0.0, 0.0)
    w_B = weights_B.astype(jnp.float32)
    ce_sum = jnp.sum(ce_B[:, 0] * w_B)
    metrics = {
        "ce_sum": ce_sum,
        "correct": jnp.sum(correct_B[:, 0] * w_B),
        "n_examples": jnp.sum(w_B),
    }
    return ce_sum, metrics


def objective_lm_loss(
    logits_BxLxV: jax.Array,
    targets_BxL: jax.Array,
    loss_mask_BxL: jax.Array,
    objective_ids_B: jax.Array,
    objective_scale_O: jax.Array,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token losses of a batch whose rows train different objectives (the unified objective:
    MLM rows predict their masked tokens in place, causal / prefix-LM rows the next token).

    ``objective_scale_O[o]`` multiplies every token of objective o in the trained sum (the
    caller sets it to ``weight_o / tokens_o`` over the whole batch, so each objective counts
    by its weight, not by how many tokens it predicts). Returns (objective_sum, metrics) with
    per-objective ``(O,)`` vectors ``ce_sum``, ``correct``, ``n_tokens``.
    """
    n_objectives = objective_scale_O.shape[0]
    mask_BxL = loss_mask_BxL.astype(jnp.float32)
    ce_BxL, objective_BxL, correct_BxL = token_losses(
        logits_BxLxV, targets_BxL, label_smoothing, z_loss
    )
    scale_B = objective_scale_O[objective_ids_B]
    total = jnp.sum(objective_BxL * mask_BxL * scale_B[:, None])

    def per_objective(x_BxL):
        return jax.ops.segment_sum(
            jnp.sum(x_BxL * mask_BxL, axis=1), objective_ids_B, num_segments=n_objectives
        )

    metrics = {
        "ce_sum": per_objective(ce_BxL),
        "correct": per_objective(correct_BxL),
        "n_tokens": per_objective(jnp.ones_like(ce_BxL)),
    }
    return total, metrics
