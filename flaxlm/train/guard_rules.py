"""Keeping a run healthy: spike / NaN detection, the skip ledger, known-good checkpoints.

A step is *bad* when its loss or gradient norm is not finite, or its loss sits more than
``k_sigma`` robust scales above the median of the last ``window`` healthy steps (or above
``max_ratio`` times that median); the gradient norm gets the same test when
``grad_norm_k_sigma`` is set. The robust scale is ``max(1.4826 * MAD, rel_floor * |median|)``:
the MAD ignores the window's own outliers, and the relative floor keeps a short or unusually
quiet window from calling ordinary noise a spike (a mean / std test with 20 samples did, after
every restart). On a bad step the loop restores the newest checkpoint that is *known good* —
followed by ``known_good_after`` healthy steps — and records the data it trained on since then
in the :class:`SkipLedger`, so those batches are never seen again. With no known-good
checkpoint the run stops (:class:`TrainingDiverged`) rather than restart from fresh weights.
All of this state travels in every checkpoint (flaxlm/train/guard_state.py), so a resumed run
decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from flaxlm.config import GuardConfig


class TrainingDiverged(RuntimeError):
    """Rollbacks did not help within the configured bounds; the message says what happened."""


@dataclass
class SkipLedger:
    """Windows of data positions (inclusive) that training must never use again."""

    windows: list[tuple[int, int]] = field(default_factory=list)

    def add(self, start: int, end: int) -> None:
        self.windows.append((int(start), int(end)))
        self.windows.sort()

    def next_allowed(self, index: int) -> int:
        """The first data position >= ``index`` outside every window."""
        moved = True
        while moved:
            moved = False
            for start, end in self.windows:
                if start <= index <= end:
                    index = end + 1
                    moved = True
        return index

    def to_json(self) -> list[list[int]]:
        return [[s, e] for s, e in self.windows]

    @classmethod
    def from_json(cls, raw: list | None) -> SkipLedger:
        return cls([(int(s), int(e)) for s, e in (raw or [])])

    @property
    def skipped(self) -> int:
        return sum(e - s + 1 for s, e in self.windows)


class SpikeDetector:
    """Rolling statistics of healthy steps; decides whether a new step is bad."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.grad_norms: deque[float] = deque(maxlen=cfg.window)

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Returns why the step is bad, or None (and remembers it as healthy)."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"grad_norm is {grad_norm}"
        reason = self._outlier("loss", loss, self.losses, self.cfg.k_sigma)
        if reason is None and self.cfg.grad_norm_k_sigma > 0:
            reason = self._outlier(
                "grad_norm", grad_norm, self.grad_norms, self.cfg.grad_norm_k_sigma
            )
        if reason:
            return reason
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        return None

    def _outlier(self, name: str, value: float, history: deque[float], k: float) -> str | None:
        if len(history) < self.cfg.warmup:
            return None
        median, scale = robust_center_scale(np.asarray(history), self.cfg.rel_floor)
        if value > median + k * scale:
            return f"{name} {value:.4g} > median {median:.4g} + {k:g} x scale {scale:.3g}"
        if self.cfg.max_ratio > 0 and value > self.cfg.max_ratio * median:
            return f"{name} {value:.4g} > {self.cfg.max_ratio:g} x median {median:.4g}"
        return None

    def reset(self) -> None:
        """After a rollback the statistics restart: the restored weights are older."""
        self.losses.clear()
        self.grad_norms.clear()

    def to_json(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms)}

    def load_json(self, raw: dict | None) -> None:
        """The window saved by :meth:`to_json` (floats round-trip exactly through JSON)."""
        self.reset()
        self.losses.extend(float(x) for x in (raw or {}).get("losses", []))
        self.grad_norms.extend(float(x) for x in (raw or {}).get("grad_norms", []))


def robust_center_scale(values: np.ndarray, rel_floor: float) -> tuple[float, float]:
    """``(median, max(1.4826 * MAD, rel_floor * |median|))`` of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    return median, max(1.4826 * mad, rel_floor * abs(median), 1e-12)


@dataclass
class RollbackPlan:
    restore_step: int
    restore_data_index: int
    window: tuple[int, int]


class RollbackPolicy:
    """Bookkeeping of checkpoints' health and of how many rollbacks were spent where."""

    def __init__(self, cfg: GuardConfig, rollbacks: int = 0, per_window: dict | None = None):
        self.cfg = cfg
        self.rollbacks = rollbacks
        self.per_restore: dict[int, int] = {int(k): v for k, v in (per_window or {}).items()}
        # step -> data position of checkpoints that are saved but not yet proven healthy
        self.candidates: dict[int, int] = {}
        # step -> data position of checkpoints followed by enough healthy steps. The initial
        # state is not one: rolling back to it would throw away every step trained.
        self.known_good: dict[int, int] = {}

    def saved(self, step: int, data_index: int) -> None:
        self.candidates[step] = data_index

    def healthy_through(self, step: int) -> list[int]:
        """Step ``step`` was healthy: promotes checkpoints that are now far enough behind."""
        promoted = [c for c in self.candidates if step - c >= self.cfg.known_good_after]
        for c in promoted:
            self.known_good[c] = self.candidates.pop(c)
        return promoted

    def newest_known_good(self) -> int | None:
        return max(self.known_good, default=None)

    def protected(self) -> set[int]:
        """Checkpoints retention must spare: the newest known-good one, and the candidates
        that may still become known good."""
        newest = self.newest_known_good()
        return {*self.candidates} | ({newest} if newest is not None else set())

    def plan(self, bad_step: int, bad_data_index: int, existing: set[int]) -> RollbackPlan:
        """Where to go back to after the bad step; raises TrainingDiverged past the bounds."""
        usable = [s for s in self.known_good if s < bad_step and s in existing]
        if not usable:
            raise TrainingDiverged(
                f"step {bad_step} is bad and no checkpoint is known good yet (one is, "
                f"guard.known_good_after={self.cfg.known_good_after} healthy steps after its "
                f"save; saved: {sorted(existing) or 'none'}); stopping rather than restarting "
                "from fresh weights"
            )
        restore = max(usable)
        self.rollbacks += 1
        self.per_restore[restore] = self.per_restore.get(restore, 0) + 1
        if self.rollbacks > self.cfg.max_rollbacks:
            raise TrainingDiverged(
                f"step {bad_step} is bad again after {self.cfg.max_rollbacks} rollbacks "
                f"(guard.max_rollbacks); stopping"
            )
        if self.per_restore[restore] > self.cfg.max_per_window:
            raise TrainingDiverged(
                f"step {bad_step} is bad again after {self.cfg.max_per_window} rollbacks to "
                f"checkpoint {restore} (guard.max_per_window); stopping"
            )
        # Checkpoints newer than the restored one saw the bad data: they stop being candidates.
        self.candidates = {s: d for s, d in self.candidates.items() if s <= restore}
        self.known_good = {s: d for s, d in self.known_good.items() if s <= restore}
        start = self.known_good[restore]
        return RollbackPlan(restore, start, (start, bad_data_index + self.cfg.margin))

    def to_json(self) -> dict:
        return {
            "rollbacks": self.rollbacks,
            "per_restore": {str(k): v for k, v in self.per_restore.items()},
            "known_good": {str(k): v for k, v in self.known_good.items()},
            "candidates": {str(k): v for k, v in self.candidates.items()},
        }

    @classmethod
    def from_json(cls, cfg: GuardConfig, raw: dict | None) -> RollbackPolicy:
        raw = raw or {}
        policy = cls(cfg, int(raw.get("rollbacks", 0)), raw.get("per_restore"))
        for k, v in (raw.get("known_good") or {}).items():
            policy.known_good[int(k)] = int(v)
        for k, v in (raw.get("candidates") or {}).items():
            policy.candidates[int(k)] = int(v)
        return policy
