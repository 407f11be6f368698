"""How the loop dispatches a step (flaxlm/train/controls.py): the LR factor is the guard's
cool-down; ``flaxlm train`` refuses chaos faults, and the chaos harness's controls
(flaxlm/train/chaos.py) inject them keyed to the data position, around the same dispatch."""

from __future__ import annotations

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from flaxlm.config import Config
from flaxlm.train import chaos
from flaxlm.train.chaos import ChaosControls
from flaxlm.train.controls import StepControls
from flaxlm.train.guard_state import GuardState


@struct.dataclass
class FakeState:
    params: dict


def fake_program() -> SimpleNamespace:
    """Stands in for a TrainProgram: its 'step' returns the state and the controls it got."""
    return SimpleNamespace(
        train_step=lambda state, batch, controls: (state, controls),
        shardings=SimpleNamespace(params=None),
    )


def config() -> Config:
    cfg = Config()
    cfg.guard.cooldown_steps, cfg.guard.cooldown_factor = 3, 0.1
    cfg.chaos.spike_at_steps, cfg.chaos.spike_lr_scale = [5], 1000.0
    cfg.chaos.nan_at_steps, cfg.chaos.hang_at_steps = [7], [9]
    return cfg


def test_the_production_factor_is_the_cool_down_after_a_rollback():
    cfg = config()
    c = StepControls(cfg, fake_program(), GuardState(cfg.guard))
    c.healing.cooldown_until = 2 + 3  # what a rollback to step 2 sets (guard.cooldown_steps=3)
    assert [c.lr_factor(s, 10 + s) for s in range(1, 7)] == [0.1, 0.1, 0.1, 0.1, 1.0, 1.0]
    assert c.lr_factor(3, 4) == 0.1  # a spike's batch is no fault here
    _, controls = c.dispatch(FakeState({"w": jnp.ones(2)}), {}, 3, 4)
    assert list(controls) == ["lr_factor"]  # the step's only control input
    assert controls["lr_factor"].dtype == np.float32 and np.isclose(controls["lr_factor"], 0.1)


def test_flaxlm_train_refuses_chaos_faults_in_one_line():
    with pytest.raises(ValueError, match="only under the chaos harness") as refused:
        StepControls.refuse_faults(config())
    message = str(refused.value)
    assert "\n" not in message and "chaos.nan_at_steps=[7]" in message, message
    assert "python -m flaxlm.train.chaos" in message
    StepControls.refuse_faults(Config())  # no faults: nothing to refuse
    ChaosControls.refuse_faults(config())  # the harness injects them


def test_chaos_follows_the_data_position_not_the_step():
    cfg = config()
    c = ChaosControls(cfg, fake_program(), GuardState(cfg.guard))
    assert c.lr_factor(step=3, data_index=4) == 1000.0  # step 5 of an undisturbed run
    assert c.lr_factor(step=4, data_index=4) == 1000.0  # the same batch, after a rollback
    assert c.lr_factor(step=4, data_index=5) == 1.0  # its batch was skipped
    c.healing.cooldown_until = 5
    assert np.isclose(c.lr_factor(3, 4), 0.1 * 1000.0)  # a cool-down multiplies with a spike


def test_chaos_nan_poisons_only_its_batch():
    cfg = config()
    c = ChaosControls(cfg, fake_program(), GuardState(cfg.guard))
    state = FakeState({"w": jnp.ones(2), "b": jnp.zeros(3)})
    poisoned, _ = c.dispatch(state, {}, 6, 6)  # the batch of step 7
    assert all(np.isnan(np.asarray(p)).all() for p in poisoned.params.values())
    clean, _ = c.dispatch(state, {}, 6, 7)  # step 7 on the next batch: that one was skipped
    assert clean is state


def test_chaos_hang_stalls_the_host_only_in_an_undisturbed_run(monkeypatch):
    cfg = config()
    c = ChaosControls(cfg, fake_program(), GuardState(cfg.guard))
    slept = []
    monkeypatch.setattr(chaos.time, "sleep", slept.append)
    c.dispatch(FakeState({}), {}, 8, 9)  # data skipped before: no hang
    assert not slept
    c.dispatch(FakeState({}), {}, 8, 8)
    assert slept == [1e6]
