"""The step controls: the one place the LR factor is decided (the guard's cool-down x chaos)."""

from __future__ import annotations

import numpy as np

from flaxlm.config import Config
from flaxlm.train.controls import StepControls
from flaxlm.train.guard_state import GuardState


def controls() -> StepControls:
    cfg = Config()
    cfg.guard.cooldown_steps, cfg.guard.cooldown_factor = 3, 0.1
    cfg.chaos.spike_at_steps, cfg.chaos.spike_lr_scale = [5], 1000.0
    cfg.chaos.nan_at_steps = [7]
    return StepControls(cfg, GuardState(cfg.guard))


def test_chaos_follows_the_data_position_not_the_step():
    c = controls()
    assert c.lr_scale(step=3, data_index=4) == 1000.0  # step 5 of an undisturbed run
    assert c.lr_scale(step=4, data_index=4) == 1000.0  # the same batch, after a rollback
    assert c.lr_scale(step=4, data_index=5) == 1.0  # its batch was skipped
    assert bool(c.for_step(6, 6)["inject_nan"]) and not bool(c.for_step(6, 7)["inject_nan"])


def test_cool_down_after_a_rollback_multiplies_with_a_spike():
    c = controls()
    c.healing.cooldown_until = 2 + 3  # what a rollback to step 2 sets (guard.cooldown_steps=3)
    assert [c.lr_scale(s, 10 + s) for s in range(1, 7)] == [0.1, 0.1, 0.1, 0.1, 1.0, 1.0]
    assert np.isclose(c.lr_scale(3, 4), 0.1 * 1000.0)
    out = c.for_step(3, 4)
    assert out["lr_scale"].dtype == np.float32 and np.isclose(out["lr_scale"], 100.0)
