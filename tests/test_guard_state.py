"""The guard's state as one collaborator (flaxlm/train/guard_state.py): detection, known-good
checkpoints, the skip ledger, and their round trip through checkpoint metadata."""

from __future__ import annotations

import json

import pytest

from flaxlm.config import GuardConfig
from flaxlm.train.guard_rules import TrainingDiverged
from flaxlm.train.guard_state import GuardState


def healthy(h: GuardState, steps: range) -> None:
    for step in steps:
        assert h.check(step, 4.0 + 0.01 * (step % 3), 1.0) is None


def test_a_spike_rolls_back_to_the_newest_known_good_checkpoint_and_skips_its_data():
    h = GuardState(GuardConfig(warmup=5, known_good_after=5))
    healthy(h, range(1, 11))
    h.saved(10, 10)
    healthy(h, range(11, 16))  # checkpoint 10 is now followed by 5 healthy steps
    h.saved(16, 16)  # too recent to be known good
    assert h.check(17, 40.0, 1.0) is not None
    plan = h.roll_back(17, 16, existing={10, 16})
    assert plan.restore_step == 10 and plan.window == (10, 16)
    assert h.next_data_index(10) == 17  # the bad stretch is never seen again


def test_state_round_trips_through_checkpoint_metadata():
    cfg = GuardConfig(warmup=5, known_good_after=2)
    h = GuardState(cfg)
    healthy(h, range(1, 6))
    h.saved(5, 5)
    healthy(h, range(6, 8))
    h.roll_back(9, 8, existing={5})
    meta = json.loads(json.dumps(h.to_meta()))  # what the checkpoint stores
    again = GuardState.from_meta(cfg, meta)
    assert again.ledger.windows == h.ledger.windows == [(5, 8)]
    assert again.protected() == h.protected()
    assert again.policy.rollbacks == again.rollbacks == 1
    assert again.cooldown_until == h.cooldown_until
    assert list(again.detector.losses) == list(h.detector.losses) == []  # reset by the rollback


def test_nan_is_bad_at_once_and_rollbacks_are_bounded():
    h = GuardState(GuardConfig(max_rollbacks=1, known_good_after=1, cooldown_steps=4))
    h.saved(1, 1)
    assert h.check(2, 3.0, 1.0) is None  # checkpoint 1 is known good now
    assert "nan" in h.check(3, float("nan"), 1.0)
    h.roll_back(3, 2, existing={1})
    assert [h.lr_factor(s) for s in range(1, 7)] == [0.1] * 4 + [1.0] * 2  # the cool-down
    with pytest.raises(TrainingDiverged, match="max_rollbacks"):
        h.roll_back(4, 3, existing={1})


def test_without_a_known_good_checkpoint_the_run_stops():
    h = GuardState(GuardConfig())
    assert "nan" in h.check(1, float("nan"), 1.0)
    with pytest.raises(TrainingDiverged, match="no checkpoint is known good"):
        h.roll_back(1, 0, existing=set())
