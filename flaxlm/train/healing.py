"""The guard's state during a run: spike detection, known-good checkpoints, rollback counts
and the skip ledger (flaxlm/train/guard.py), as one collaborator of the loop.

    healing = SelfHealing.from_meta(cfg.guard, meta)      # or SelfHealing(cfg.guard)
    reason = healing.check(step, loss, grad_norm)          # None: healthy
    plan = healing.roll_back(bad_step, bad_data_index, existing_checkpoints)
    data_index = healing.next_data_index(plan.restore_data_index)

Its state goes into every checkpoint's metadata (:meth:`to_meta`), so a resumed run continues
with the same ledger and the same knowledge of which checkpoints are known good.
"""

from __future__ import annotations

from typing import Any

from flaxlm.config import GuardConfig
from flaxlm.train.guard import RollbackPlan, RollbackPolicy, SkipLedger, SpikeDetector


class SelfHealing:
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

    @classmethod
    def from_meta(cls, cfg: GuardConfig, meta: dict[str, Any]) -> SelfHealing:
        """The state saved in a checkpoint's metadata by :meth:`to_meta`."""
        return cls(
            cfg,
            SkipLedger.from_json(meta.get("skip_ledger")),
            RollbackPolicy.from_json(cfg, meta.get("rollback_policy")),
        )

    def to_meta(self) -> dict[str, Any]:
        return {"skip_ledger": self.ledger.to_json(), "rollback_policy": self.policy.to_json()}

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
        newest known-good checkpoint; the data since then joins the skip ledger. Raises
        TrainingDiverged past ``guard.max_rollbacks`` / ``guard.max_per_window``."""
        plan = self.policy.plan(bad_step, bad_data_index, existing)
        self.ledger.add(*plan.window)
        self.detector.reset()
        return plan

    def next_data_index(self, index: int) -> int:
        """The first data position >= ``index`` outside the skip ledger."""
        return self.ledger.next_allowed(index)
