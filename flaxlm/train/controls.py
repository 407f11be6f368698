"""How the loop dispatches a train step: the batch plus the step's one control input, the
learning-rate factor (the cool-down after a rollback, kept in the guard's state,
flaxlm/train/guard_state.py). The optimizer multiplies its schedule by it
(:class:`flaxlm.train.optim.LearningRate`), so the LR is decided there and nowhere else.

This is also the loop's seam for fault injection: ``train(cfg, controls=...)`` takes a
subclass, and only the chaos harness (flaxlm/train/chaos.py) passes one. The production step
holds no fault code; ``flaxlm train`` refuses a config that asks for ``chaos.*`` faults.
"""

from __future__ import annotations

from typing import Any

from flax.training.train_state import TrainState

from flaxlm.config import Config
from flaxlm.train.guard_state import GuardState
from flaxlm.train.program import TrainProgram
from flaxlm.train.step import step_controls

CHAOS_HARNESS = "python -m flaxlm.train.chaos CONFIG [overrides]"


class StepControls:
    injects_faults = False  # the chaos harness's subclass does

    def __init__(self, cfg: Config, program: TrainProgram, healing: GuardState):
        self.program, self.healing = program, healing

    @classmethod
    def refuse_faults(cls, cfg: Config) -> None:
        """Raises ValueError (one line) when ``cfg`` schedules chaos faults these controls
        would not inject: a run that asked for faults must not pass silently without them."""
        if cls.injects_faults:
            return
        chaos = cfg.chaos
        asked = [
            f"chaos.{name}={value}"
            for name, value in (
                ("spike_at_steps", chaos.spike_at_steps),
                ("nan_at_steps", chaos.nan_at_steps),
                ("hang_at_steps", chaos.hang_at_steps),
            )
            if value
        ]
        if asked:
            raise ValueError(
                f"{', '.join(asked)}: chaos faults run only under the chaos harness "
                f"({CHAOS_HARNESS}); flaxlm train never injects them"
            )

    def lr_factor(self, step: int, data_index: int) -> float:
        """The factor on the scheduled LR of the step after ``step`` (which trains on data
        position ``data_index``): the guard's cool-down."""
        return self.healing.lr_factor(step)

    def dispatch(
        self, state: TrainState, batch: dict[str, Any], step: int, data_index: int
    ) -> tuple[TrainState, dict[str, Any]]:
        """Dispatches the step after ``step`` on ``batch`` (data position ``data_index``);
        returns the new state and the step's metrics, both still on the device."""
        controls = step_controls(self.lr_factor(step, data_index))
        return self.program.train_step(state, batch, controls)
