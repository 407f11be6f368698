"""Benchmark tasks during training: ``train.eval_tasks`` run every ``train.eval_tasks_every``
steps (0: at every evaluation) and at the end, their metrics logged as
``tasks/<task>/<metric>`` in the evaluation record, beside ``val_loss``.

The tasks load, and the family is checked against their request types, when the trainer
starts: a missing task, a bad YAML or a family that cannot score it is a one-line ConfigError
before step 1, not an error at the first evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flaxlm.config import Config, ConfigError
from flaxlm.families import build_model
from flaxlm.tasks.runner import TaskSuite, task_scalars
from flaxlm.tasks.scorer import Scorer
from flaxlm.tasks.spec import TaskError


@dataclass
class _Live:
    """What the scorer reads: the run's model and its current parameters."""

    cfg: Config
    model: Any
    tokenizer: Any
    mesh: Any
    params: Any = None
    step: int = 0


class TrainingTasks:
    def __init__(self, cfg: Config, mesh: Any, tokenizer: Any):
        t = cfg.train
        every = t.eval_tasks_every
        if every < 0 or (every and t.eval_every and every % t.eval_every):
            raise ConfigError(
                f"train.eval_tasks_every={every} must be 0 (every evaluation) or a multiple "
                f"of train.eval_every={t.eval_every}"
            )
        self.cfg, self.every = cfg, every or t.eval_every
        self.live = _Live(cfg, build_model(cfg.model), tokenizer, mesh)
        try:
            self.suite = TaskSuite.load(t.eval_tasks)
            self.scorer = Scorer(self.live)
            self.suite.check(self.scorer)
        except TaskError as exc:
            raise ConfigError(f"train.eval_tasks: {exc}") from None

    @classmethod
    def for_config(cls, cfg: Config, mesh: Any, tokenizer: Any) -> TrainingTasks | None:
        return cls(cfg, mesh, tokenizer) if cfg.train.eval_tasks else None

    def due(self, step: int) -> bool:
        return step == self.cfg.train.steps or (bool(self.every) and step % self.every == 0)

    def run(self, params: Any, step: int) -> dict[str, float]:
        """``tasks/<task>/<metric>`` -> value for ``params``."""
        self.live.params, self.live.step = params, step
        return task_scalars(self.suite.run(self.scorer))
