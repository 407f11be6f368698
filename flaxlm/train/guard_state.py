"""The guard's state during a run — spike detection's rolling window, known-good checkpoints,
rollback counts, the skip ledger and the LR cool-down — as one collaborator of the loop.

    healing = GuardState.from_meta(cfg.guard, meta)      # or GuardState(cfg.guard)
    reason = healing.check(step, loss, grad_norm)          # None: healthy
    plan = healing.roll_back(bad_step, bad_data_index, existing_checkpoints)
    data_index = healing.next_data_index(plan.restore_data_index)

All of it goes into every checkpoint's metadata (:meth:`to_meta`), and into the rollback
record written before a rollback deletes anything (flaxlm/train/run_checkpoints.py), so a run
killed at any moment and resumed makes exactly the decisions of the uninterrupted run.
"""

from __future__ import annotations

from typing import Any

from flaxlm.config import GuardConfig
from flaxlm.train.guard_rules import RollbackPlan, RollbackPolicy, SkipLedger, SpikeDetector


class GuardState:
    def __init__(
        self,
        cfg: GuardConfig,
        ledger: SkipLedger | None = None,
        policy: RollbackPolicy | None = None,
    ):
        self.cfg = cfg
        self.detector = SpikeDetector(cfg)
        self.ledger = ledger or SkipLedger()
        self.policy = policy or RollbackPolicy(cfg)
        self.cooldown_until = 0  # steps before this one run at guard.cooldown_factor x LR

    @classmethod
    def from_meta(cls, cfg: GuardConfig, meta: dict[str, Any]) -> GuardState:
        """The state saved by :meth:`to_meta` (in a checkpoint or a rollback record)."""
        healing = cls(
            cfg,
            SkipLedger.from_json(meta.get("skip_ledger")),
            RollbackPolicy.from_json(cfg, meta.get("rollback_policy")),
        )
        healing.detector.load_json(meta.get("detector"))
        healing.cooldown_until = int(meta.get("cooldown_until", 0))
        return healing

    def to_meta(self) -> dict[str, Any]:
        return {
            "skip_ledger": self.ledger.to_json(),
            "rollback_policy": self.policy.to_json(),
            "detector": self.detector.to_json(),
            "cooldown_until": self.cooldown_until,
        }

    @property
    def rollbacks(self) -> int:
        """Rollbacks so far: orders two saved states of one run (more = newer)."""
        return self.policy.rollbacks

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """Why step ``step`` is bad, or None (then it counts as healthy)."""
        reason = self.detector.check(loss, grad_norm) if self.cfg.enabled else None
        if reason is None:
            self.policy.healthy_through(step)
        return reason

    def saved(self, step: int, data_index: int) -> None:
        """A checkpoint of ``step`` (next data position ``data_index``) is being written."""
        self.policy.saved(step, data_index)

    def protected(self) -> set[int]:
        """Checkpoints retention must keep."""
        return self.policy.protected()

    def roll_back(self, bad_step: int, bad_data_index: int, existing: set[int]) -> RollbackPlan:
        """Where to go after bad step ``bad_step`` (which trained on ``bad_data_index``): the
        newest known-good checkpoint; the data since then joins the skip ledger, and the LR
        cools down for ``guard.cooldown_steps``. Raises TrainingDiverged past
        ``guard.max_rollbacks`` / ``guard.max_per_window``, or with no known-good checkpoint."""
        plan = self.policy.plan(bad_step, bad_data_index, existing)
        self.ledger.add(*plan.window)
        self.detector.reset()
        self.cooldown_until = plan.restore_step + self.cfg.cooldown_steps
        return plan

    def lr_factor(self, step: int) -> float:
        """The cool-down factor of the step after ``step``; the optimizer multiplies its
        scheduled LR by it (:class:`flaxlm.train.optim.LearningRate`)."""
        return self.cfg.cooldown_factor if step < self.cooldown_until else 1.0

    def next_data_index(self, index: int) -> int:
        """The first data position >= ``index`` outside the skip ledger."""
        return self.ledger.next_allowed(index)
