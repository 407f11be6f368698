"""Evaluation during training: the family's report on the first ``train.eval_batches``
batches of the validation split, logged at ``train.eval_every`` and at the end; with
``train.eval_tasks``, the tasks' metrics too (flaxlm/tasks/training.py), loaded at start-up."""

from __future__ import annotations

from typing import Any

import jax

from flaxlm.config import Config
from flaxlm.families import Family
from flaxlm.tasks.training import TrainingTasks
from flaxlm.train.batches import evaluate_batches


class Evaluator:
    def __init__(self, cfg: Config, family: Family, eval_step, mesh, val_split, tokenizer):
        self.cfg, self.family, self.eval_step, self.mesh = cfg, family, eval_step, mesh
        self.batch_size = cfg.train.batch_size // cfg.train.grad_accum
        self.batches = family.eval_batches(val_split, cfg, tokenizer, self.batch_size)
        self.tasks = TrainingTasks.for_config(cfg, mesh, tokenizer)  # fails now, not at step N

    def due(self, step: int) -> bool:
        """Evaluate after ``step``? (The last step is evaluated once the loop ends.)"""
        every = self.cfg.train.eval_every
        return bool(every) and step % every == 0 and step < self.cfg.train.steps

    def run(self, params, step: int) -> dict[str, Any]:
        """``{"step": step, "val_loss": ..., <the family's fields>}``."""
        local = self.batches.eval_batches(
            self.batch_size, self.cfg.train.eval_batches, jax.process_index(), jax.process_count()
        )
        report = evaluate_batches(self.eval_step, params, local, self.mesh, self.family, self.cfg)
        if self.tasks is not None and self.tasks.due(step):
            report.update(self.tasks.run(params, step))
        return {"step": step, **report}
