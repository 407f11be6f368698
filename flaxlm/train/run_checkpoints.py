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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flax.training.train_state import TrainState

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
        self.run_dir = Path(cfg.train.run_dir)
        self.checkpointer = Checkpointer(
            self.run_dir, cfg.checkpoint.keep, cfg.checkpoint.asynchronous
        )

    def resume_or_start(self, announce: bool = False) -> Start:
        """The newest intact checkpoint with the run's position and guard state (newer ones
        that failed verification are removed) — or, when a rollback happened after it, the point
        that rollback restored — or the fresh state at step 0. ``announce`` prints where."""
        if self.checkpointer.latest_step() is None:
            return Start(self.model_state.fresh(), 0, 0, GuardState(self.cfg.guard), None, 0)
        ms = self.model_state
        state, meta = self.checkpointer.restore(ms.abstract, ms.shardings)
        step = int(meta["step"])
        # Newer checkpoints that failed verification go; anything intact stays.
        self.checkpointer.delete_after(step, only=self.checkpointer.walked_past)
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
        self.checkpointer.save(state, meta, self.tokenizer_bytes, protect=healing.protected())

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
            _write_durably(self.run_dir / ROLLBACK_FILE, json.dumps(record))
            _write_durably(self.run_dir / "skip_ledger.json", json.dumps(healing.ledger.to_json()))
        return self._restore_exactly(plan.restore_step)

    def _restore_exactly(self, step: int) -> TrainState:
        """Deletes every checkpoint newer than ``step`` and restores ``step``."""
        self.checkpointer.delete_after(step)
        ms = self.model_state
        return self.checkpointer.restore(ms.abstract, ms.shardings, step)[0]

    def _rollback_record(self) -> dict[str, Any] | None:
        path = self.run_dir / ROLLBACK_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:  # written atomically: this is outside damage
            raise CheckpointError(f"{path} is not valid JSON ({exc}); remove it to resume") from exc

    def due(self, step: int, last_step: int) -> bool:
        """Save after ``step``? Every ``checkpoint.every`` steps; the last step is saved once
        the loop ends."""
        return step % self.cfg.checkpoint.every == 0 and step != last_step

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


def _write_durably(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically and syncs it (and the folder) to disk."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
