"""Optax optimizer and learning-rate schedules built from :class:`OptimConfig`.

The schedule's clock (``optim.schedule_unit``): ``steps`` counts optimizer steps; ``tokens``
counts the tokens trained before a step in units of full batches (``train.batch_size`` x
``seq_len``), so under a batch ramp (``train.batch_ramp``, flaxlm/data/batch_ramp.py) the warmup and
the decay follow the tokens, as in large GPT runs. The token count of optimizer step ``k`` is
the ramp's rows before data position ``k``: exact in a run without rollbacks, and always a pure
function of ``k`` (a rollback that skips data does not move the schedule), so resume and
replay stay exact. Without a ramp both clocks agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from flaxlm.config import OptimConfig
from flaxlm.data.batch_ramp import BatchRamp


def make_schedule(
    cfg: OptimConfig, total_steps: int, d_model: int, ramp: BatchRamp | None = None
) -> optax.Schedule:
    """The learning rate as a function of the (0-based) optimizer step.

    With ``cfg.schedule_unit == "tokens"`` and a ``ramp``, the shapes below read ``step`` as
    the full batches of tokens before it (``ramp.full_batches(step)``), and the default
    ``decay_steps`` is the full batches of the whole run (``total_steps`` of it).

    - ``cosine`` / ``linear``: linear warmup from 0 to ``lr`` over ``warmup_steps``, then decay
      to ``min_lr_ratio * lr`` at ``decay_steps`` (default: ``total_steps``), flat afterwards.
    - ``constant``: linear warmup, then ``lr``.
    - ``noam``: ``lr * d_model**-0.5 * min(n**-0.5, n * warmup**-1.5)`` with ``n = step + 1``
      (Vaswani et al.; ``lr`` is the scale factor, 1.0 reproduces the paper).
    """
    if cfg.schedule_unit == "tokens" and ramp is not None and ramp.ramped:
        total = float(ramp.full_batches(total_steps))
        by_tokens = make_schedule(cfg, total, d_model)  # type: ignore[arg-type]
        return lambda step: by_tokens(ramp.full_batches(step, jnp))
    peak, warmup = cfg.lr, cfg.warmup_steps
    decay_steps = cfg.decay_steps or total_steps
    floor = cfg.min_lr_ratio * peak
    if cfg.schedule == "noam":
        w = max(warmup, 1)

        def noam(step):
            n = jnp.asarray(step, jnp.float32) + 1.0
            return peak * d_model**-0.5 * jnp.minimum(n**-0.5, n * w**-1.5)

        return noam
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(
            peak, max(decay_steps - warmup, 1), alpha=cfg.min_lr_ratio
        )
    else:  # linear
        after = optax.linear_schedule(peak, floor, max(decay_steps - warmup, 1))
    if warmup <= 0:
        return after
    return optax.join_schedules([warm, after], boundaries=[warmup])


def decay_mask(params):
    """Weight decay applies to matrices (kernels, embeddings), not to biases or norm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, d_model: int, ramp: BatchRamp | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; returns the transformation and its schedule (``ramp``:
    the run's ``train.batch_ramp``, for ``optim.schedule_unit: tokens``)."""
    schedule = make_schedule(cfg, total_steps, d_model, ramp)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule
