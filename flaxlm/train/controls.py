"""The per-step inputs of the train step besides the batch: the learning-rate factor and the
chaos faults. The one place the effective learning rate's factor is decided:
``lr_scale = cool-down after a rollback (the guard's state) x chaos spike`` (the step multiplies
the schedule by it, :func:`flaxlm.train.step.effective_lr`).

A fault is attached to the batch that step s trains on in an undisturbed run (data position
s - 1), so after a rollback it is skipped with its batch, as a real bad batch would be.
"""

from __future__ import annotations

import time

import numpy as np

from flaxlm.config import Config
from flaxlm.train.guard_state import GuardState
from flaxlm.train.step import step_controls


class StepControls:
    def __init__(self, cfg: Config, healing: GuardState):
        self.chaos, self.healing = cfg.chaos, healing
        self.spikes, self.nans = set(cfg.chaos.spike_at_steps), set(cfg.chaos.nan_at_steps)

    def lr_scale(self, step: int, data_index: int) -> float:
        """The factor on the scheduled learning rate of the step after ``step``, which trains
        on data position ``data_index``."""
        scale = self.healing.lr_factor(step)
        if data_index + 1 in self.spikes:
            scale *= self.chaos.spike_lr_scale
        return scale

    def for_step(self, step: int, data_index: int) -> dict[str, np.ndarray]:
        """The controls of the step after ``step``; a chaos hang stalls the host here."""
        if step + 1 in self.chaos.hang_at_steps and data_index == step:
            time.sleep(1e6)  # a stalled host, for the watchdog to catch
        return step_controls(self.lr_scale(step, data_index), data_index + 1 in self.nans)
