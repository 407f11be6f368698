"""A run's checkpoints as the loop sees them: the train state plus where the run is (data
position, seed, the guard's state, how many metrics.jsonl lines belong to it, the resolved
config), saved together and restored together. Wraps
:class:`flaxlm.checkpoint.manager.Checkpointer`,
which owns the files.

    ckpts = RunCheckpoints(cfg, model_state, tokenizer_bytes)
    start = ckpts.resume_or_start()   # a checkpoint (or an interrupted rollback), or step 0
    ckpts.save(state, step, data_index, healing, metrics_lines)
    state = ckpts.roll_back(plan, data_index, healing, metrics_lines)

A rollback writes its outcome — the restored step, the guard's new state (with the grown skip
ledger), the data position to continue at — to ``rollback.json`` (atomically, synced to disk)
*before* it deletes the checkpoints newer than the restored one. A run killed anywhere in or
after the rollback resumes from that record, so it never trains on the skipped data again
and decides as the uninterrupted run would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jax
from flax.training.train_state import TrainState

from flaxlm import storage
from flaxlm.checkpoint.manager import Checkpointer, CheckpointError
from flaxlm.config import Config, to_dict
from flaxlm.train.guard_rules import RollbackPlan
from flaxlm.train.guard_state import GuardState
from flaxlm.train.program import TrainProgram

ROLLBACK_FILE = "rollback.json"


@dataclass
class Start:
    """Where a run starts: a restored checkpoint, or step 0."""

    state: TrainState
    step: int
    data_index: int
    healing: GuardState
    resumed_from: int | None  # the checkpoint's step; None on a fresh start
    metrics_lines: int | None = None  # lines of metrics.jsonl that belong to this point


class RunCheckpoints:
    def __init__(self, cfg: Config, model_state: TrainProgram, tokenizer_bytes: bytes):
        self.cfg, self.model_state, self.tokenizer_bytes = cfg, model_state, tokenizer_bytes
        self.run_dir = str(cfg.train.run_dir)  # a folder or a bucket URL (flaxlm.storage)
        self.checkpointer = Checkpointer(
            self.run_dir,
            cfg.checkpoint.keep,
            cfg.checkpoint.asynchronous,
            cfg.checkpoint.local_dir or None,
        )
        self._local_only = False  # the save ``due`` asked for goes to the local tier only

    def resume_or_start(self, announce: bool = False) -> Start:
        """The newest intact checkpoint with the run's position and guard state (newer ones
        that failed verification are removed) — or, when a rollback happened after it, the point
        that rollback restored — or the fresh state at step 0. ``announce`` prints where."""
        if not self.checkpointer.restorable_steps():  # the same answer on every host
            return Start(self.model_state.fresh(), 0, 0, GuardState(self.cfg.guard), None, 0)
        ms = self.model_state
        state, meta = self.checkpointer.restore(ms.abstract, ms.shardings)
        step = int(meta["step"])
        # Newer checkpoints that failed verification go; anything intact stays.
        self.checkpointer.delete_after(step, only=self.checkpointer.walked_past)
        if self.checkpointer.local_tier and step in self.checkpointer.fetched:
            self._say_fetched(step)
        healing = GuardState.from_meta(self.cfg.guard, meta)
        data_index, lines = int(meta["data_index"]), meta.get("metrics_lines")
        record = self._rollback_record()
        if record is not None and record["rollbacks"] > healing.rollbacks:
            # The run was killed after a rollback that this checkpoint predates: finish it.
            step, data_index = int(record["restore_step"]), int(record["data_index"])
            healing = GuardState.from_meta(self.cfg.guard, record["guard"])
            lines = record["metrics_lines"]
            state = self._restore_exactly(step)
        if announce:
            ledger = healing.ledger.to_json()
            skipped = f", skip ledger {ledger}" if ledger else ""
            print(f"resuming {self.run_dir} from step {step}{skipped}")
        return Start(state, step, data_index, healing, step, lines)

    def _say_fetched(self, step: int) -> None:
        """One line: the local tier could not serve the resume (a wiped or replaced disk)."""
        ckpt = self.checkpointer
        if jax.process_count() == 1:
            print(
                f"checkpoint.local_dir {ckpt.directory} holds no intact checkpoint of step "
                f"{step} or later: resuming from {ckpt.location}"
            )
        elif jax.process_index() == 0:
            print(
                f"checkpoint.local_dir {self.cfg.checkpoint.local_dir} does not hold an intact "
                f"checkpoint of step {step} or later on every host: resuming from {ckpt.location}"
            )

    def save(
        self,
        state: TrainState,
        step: int,
        data_index: int,
        healing: GuardState,
        metrics_lines: int,
    ) -> None:
        """Starts an (async) save of ``state`` at ``step``; the run resumes at ``data_index``
        with the first ``metrics_lines`` lines of metrics.jsonl."""
        healing.saved(step, data_index)
        meta: dict[str, Any] = {
            "data_index": data_index,
            "seed": self.cfg.train.seed,
            **healing.to_meta(),
            "metrics_lines": metrics_lines,
            "config": to_dict(self.cfg),
        }
        persistent, self._local_only = not self._local_only, False
        self.checkpointer.save(
            state, meta, self.tokenizer_bytes, protect=healing.protected(), persistent=persistent
        )

    def roll_back(
        self, plan: RollbackPlan, data_index: int, healing: GuardState, metrics_lines: int
    ) -> TrainState:
        """Records the rollback durably, then deletes the checkpoints newer than
        ``plan.restore_step`` (they hold weights from the bad stretch) and restores it.
        ``healing`` is the guard's state after the rollback; the run continues at
        ``data_index`` with ``metrics_lines`` lines of metrics.jsonl."""
        if jax.process_index() == 0:
            record = {
                "rollbacks": healing.rollbacks,
                "restore_step": plan.restore_step,
                "data_index": data_index,
                "metrics_lines": metrics_lines,
                "guard": healing.to_meta(),
            }
            # Whole or not at all: a synced rename on disk, one PUT on an object store.
            storage.write_text(storage.join(self.run_dir, ROLLBACK_FILE), json.dumps(record))
            ledger = json.dumps(healing.ledger.to_json())
            storage.write_text(storage.join(self.run_dir, "skip_ledger.json"), ledger)
        return self._restore_exactly(plan.restore_step)

    def _restore_exactly(self, step: int) -> TrainState:
        """Deletes every checkpoint newer than ``step`` and restores ``step``."""
        self.checkpointer.delete_after(step)
        ms = self.model_state
        return self.checkpointer.restore(ms.abstract, ms.shardings, step)[0]

    def _rollback_record(self) -> dict[str, Any] | None:
        path = storage.join(self.run_dir, ROLLBACK_FILE)
        try:
            return json.loads(storage.read_text(path))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:  # written atomically: this is outside damage
            raise CheckpointError(f"{path} is not valid JSON ({exc}); remove it to resume") from exc

    def due(self, step: int, last_step: int) -> bool:
        """Save after ``step``? Every ``checkpoint.every`` steps to the run dir, and every
        ``checkpoint.local_every`` steps to the local tier only; the last step is saved once
        the loop ends (to the run dir)."""
        c = self.cfg.checkpoint
        persistent = step % c.every == 0
        local = bool(c.local_every) and step % c.local_every == 0
        self._local_only = local and not persistent and step != last_step
        return (persistent or local) and step != last_step

    def steps(self) -> set[int]:
        """Steps of the complete checkpoints, after any save in flight has finished (an async
        save is sealed only once it is done; a rollback must see it)."""
        self.checkpointer.wait()
        return set(self.checkpointer.steps())

    def latest_step(self) -> int | None:
        return self.checkpointer.latest_step()

    def close(self) -> None:
        """Waits until every checkpoint is durable, manifests included."""
        self.checkpointer.close()
