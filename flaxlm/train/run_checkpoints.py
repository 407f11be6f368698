"""A run's checkpoints as the loop sees them: the train state plus where the run is (data
position, seed, the guard's state, the resolved config), saved together and restored
together. Wraps :class:`flaxlm.checkpoint.Checkpointer`, which owns the files.

    ckpts = RunCheckpoints(cfg, model_state, tokenizer_bytes)
    start = ckpts.resume_or_start()   # a checkpoint, or step 0
    ckpts.save(state, data_index, healing)
    state = ckpts.restore(step)       # step 0: the initial state, recreated from the seed
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flax.training.train_state import TrainState

from flaxlm.checkpoint import Checkpointer
from flaxlm.config import Config, to_dict
from flaxlm.train.healing import SelfHealing
from flaxlm.train.model_state import ModelState


@dataclass
class Start:
    """Where a run starts: a restored checkpoint, or step 0."""

    state: TrainState
    step: int
    data_index: int
    healing: SelfHealing
    resumed_from: int | None  # the checkpoint's step; None on a fresh start


class RunCheckpoints:
    def __init__(self, cfg: Config, model_state: ModelState, tokenizer_bytes: bytes):
        self.cfg, self.model_state, self.tokenizer_bytes = cfg, model_state, tokenizer_bytes
        self.checkpointer = Checkpointer(
            Path(cfg.train.run_dir), cfg.checkpoint.keep, cfg.checkpoint.asynchronous
        )

    def resume_or_start(self, announce: bool = False) -> Start:
        """The newest intact checkpoint with the run's position and guard state (newer damaged
        or unsealed folders are removed), or the fresh state at step 0. ``announce`` prints
        where the run resumes."""
        if self.checkpointer.latest_step() is None:
            fresh = self.model_state.fresh()
            return Start(fresh, 0, 0, SelfHealing(self.cfg.guard), None)
        ms = self.model_state
        state, meta = self.checkpointer.restore(ms.abstract, ms.shardings)
        step = int(meta["step"])
        self.checkpointer.delete_after(step)
        healing = SelfHealing.from_meta(self.cfg.guard, meta)
        if announce:
            ledger = healing.ledger.to_json()
            skipped = f", skip ledger {ledger}" if ledger else ""
            print(f"resuming {self.cfg.train.run_dir} from step {step}{skipped}")
        return Start(state, step, int(meta["data_index"]), healing, step)

    def save(self, state: TrainState, step: int, data_index: int, healing: SelfHealing) -> None:
        """Starts an (async) save of ``state`` at ``step``; the run resumes at ``data_index``."""
        healing.saved(step, data_index)
        meta: dict[str, Any] = {
            "data_index": data_index,
            "seed": self.cfg.train.seed,
            **healing.to_meta(),
            "config": to_dict(self.cfg),
        }
        self.checkpointer.save(state, meta, self.tokenizer_bytes, protect=healing.protected())

    def restore(self, step: int) -> TrainState:
        """The state of checkpoint ``step``, after deleting every newer checkpoint (they hold
        weights from a bad stretch); step 0 is recreated from the seed."""
        self.checkpointer.delete_after(step)
        if step == 0:
            return self.model_state.fresh()
        state, _ = self.checkpointer.restore(
            self.model_state.abstract, self.model_state.shardings, step
        )
        return state

    def steps(self) -> set[int]:
        return set(self.checkpointer.steps())

    def latest_step(self) -> int | None:
        return self.checkpointer.latest_step()

    def close(self) -> None:
        """Waits until every checkpoint is durable, manifests included."""
        self.checkpointer.close()
