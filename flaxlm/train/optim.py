"""Optax optimizer and learning-rate schedules built from :class:`OptimConfig`.

The schedule's clock (``optim.schedule_unit``): ``steps`` counts optimizer steps; ``tokens``
counts the tokens trained before a step in units of full batches (``train.batch_size`` x
``seq_len``), so under a batch ramp (``train.batch_ramp``, flaxlm/data/batch_ramp.py) the warmup and
the decay follow the tokens, as in large GPT runs. The token count of optimizer step ``k`` is
the ramp's rows before data position ``k``: exact in a run without rollbacks, and always a pure
function of ``k`` (a rollback that skips data does not move the schedule), so resume and
replay stay exact. Without a ramp both clocks agree.

The learning rate a step applies is decided in one place, :class:`LearningRate`: the schedule
times a live factor (the cool-down after a rollback, from the guard's state,
flaxlm/train/guard_state.py). The factor reaches the optimizer as an argument of its update
(``tx.update(..., lr_factor=f)``), a traced value, so a new factor never recompiles the step;
the step logs ``LearningRate(step, f)``, the value the update applied.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class LearningRate:
    """The learning rate of each update: ``schedule(step) * factor``.

    ``schedule``: a pure function of the 0-based optimizer step (:func:`make_schedule`), so
    resume and rollback replay it exactly; ``factor``: the live multiplier (1 outside a
    cool-down). :meth:`transformation` is the optimizer's only learning-rate stage.
    """

    schedule: optax.Schedule

    def __call__(self, step: jax.Array | int, factor: jax.Array | float = 1.0) -> jax.Array:
        return self.schedule(step) * factor

    def transformation(self) -> optax.GradientTransformationExtraArgs:
        """Scales updates by ``-self(count, lr_factor)``; ``lr_factor`` is an extra argument of
        the update (default 1). Its state is optax's ``ScaleByScheduleState(count)``, the state
        ``optax.adamw``'s own learning-rate stage keeps, so checkpoints written before the
        factor moved into the optimizer restore unchanged."""

        def init(params):
            del params
            return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

        def update(updates, state, params=None, *, lr_factor=1.0, **extra):
            del params, extra
            step_size = -self(state.count, lr_factor)
            updates = jax.tree.map(lambda g: jnp.asarray(step_size, g.dtype) * g, updates)
            return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

        return optax.GradientTransformationExtraArgs(init, update)


def decay_mask(params):
    """Weight decay applies to matrices (kernels, embeddings), not to biases or norm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, d_model: int, ramp: BatchRamp | None = None
) -> tuple[optax.GradientTransformationExtraArgs, LearningRate]:
    """AdamW with global-norm clipping; returns the transformation and its learning rate
    (``ramp``: the run's ``train.batch_ramp``, for ``optim.schedule_unit: tokens``). Update
    with ``tx.update(grads, opt_state, params, lr_factor=f)`` to scale the scheduled LR by f.

    AdamW is ``optax.adamw``'s own chain with :meth:`LearningRate.transformation` as its last
    stage: the same arithmetic and the same state tree as before the factor moved in."""
    lr = LearningRate(make_schedule(cfg, total_steps, d_model, ramp))
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    adamw = optax.chain(
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, decay_mask),
        lr.transformation(),
    )
    return optax.chain(*parts, adamw), lr
