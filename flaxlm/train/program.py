"""What the loop trains, set up once: the family's model on the mesh, the optimizer, the
state's shapes and shardings, and the jitted train and eval steps.

    ms = TrainProgram.build(cfg, family)
    state = ms.fresh()                               # initialised into its shards
    state, metrics = ms.train_step(state, batch, controls)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optax
from flax import linen as nn
from flax.training.train_state import TrainState
from jax.sharding import Mesh

from flaxlm.config import Config
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.families import Family
from flaxlm.parallel.sharding import build_mesh
from flaxlm.train.batches import check_train_batches_fit
from flaxlm.train.optim import LearningRate, make_optimizer
from flaxlm.train.state import abstract_state, create_state, state_shardings
from flaxlm.train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step


@dataclass
class TrainProgram:
    cfg: Config
    family: Family
    mesh: Mesh
    model: nn.Module
    tx: optax.GradientTransformation
    learning_rate: LearningRate  # schedule x live factor: what the step applies and logs
    shardings: TrainState
    abstract: TrainState
    train_step: Any
    eval_step: Any

    @classmethod
    def build(
        cls, cfg: Config, family: Family, mesh: Mesh | None = None, ramp: BatchRamp | None = None
    ) -> TrainProgram:
        """``ramp``: the run's BatchRamp (the loop builds one and shares it); else the
        config's."""
        mesh = build_mesh(cfg.mesh) if mesh is None else mesh
        check_train_batches_fit(cfg.train, mesh)  # the full batch and each batch_ramp size
        seq_len = cfg.data.seq_len
        model = family.build_model(cfg.model)
        ramp = BatchRamp.from_config(cfg.train) if ramp is None else ramp
        tx, learning_rate = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.d_model, ramp)
        shardings = state_shardings(model, tx, mesh, seq_len)
        train_step = jit_train_step(
            make_train_step(model, family, cfg, learning_rate),
            mesh,
            shardings,
            family.batch_keys(cfg, True),
        )
        eval_step = jit_eval_step(
            make_eval_step(model, family, cfg),
            mesh,
            shardings.params,
            family.batch_keys(cfg, False),
        )
        abstract = abstract_state(model, tx, seq_len)
        return cls(
            cfg, family, mesh, model, tx, learning_rate, shardings, abstract, train_step, eval_step
        )

    def fresh(self) -> TrainState:
        """The initial state of ``train.seed``, initialised directly into its shards."""
        return create_state(
            self.model, self.tx, self.mesh, self.cfg.data.seq_len, self.cfg.train.seed,
            shardings=self.shardings,
        )[0]  # fmt: skip
