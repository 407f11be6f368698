"""Goodput: where a run's wall-clock time went, across kills, restarts and rollbacks.

    clock = GoodputClock.open(run_dir, write=is_main)      # reads RUN_DIR/goodput.jsonl
    clock.resumed(start_step)                              # after the restore
    clock.enter("step", 5)                                 # the loop's phases, as they begin
    clock.saved(10); clock.rolled_back(10)                 # the lineage of the steps
    clock.fraction()                                       # productive / wall-clock so far

Every second since the run began (the first attempt's start) falls in exactly one part:

- ``productive``: train steps that the final run keeps;
- ``compile``: the first step of each attempt (its dispatch traces and compiles the step;
  from the second step on, the time is the steps', so that the first logged record already
  has productive time: ``goodput`` is in (0, 1] on every step record);
- ``data``: the host assembling a batch while the device had nothing left to run;
- ``eval``, ``checkpoint_save``, ``checkpoint_restore`` (a resume's restore and a
  rollback's), ``startup`` (data preparation, the model's build, before the first step);
- ``rollback_discarded``: the steps a rollback threw away (their data is skipped);
- ``restart_replayed``: the steps trained after the checkpoint a restarted attempt resumed
  from, lost with the kill and trained again;
- ``lost``: from the last record of a killed attempt to the next attempt's start (the kill,
  the scheduler, the interpreter's start);
- ``other``: host work between phases (the final drain, the plots).

The clock appends one line to ``RUN_DIR/goodput.jsonl`` at every phase change but steps and at
every ``train.log_every``-th step: the time, the step, the run's wall-clock so far and all
parts, which add up to it. The file is never truncated; a restarted attempt reads its last
line and the line of the checkpoint it resumed from, so the parts still add up. ``goodput`` =
``productive`` / wall-clock: in (0, 1], also on every metrics.jsonl step record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flaxlm import storage
from flaxlm.train.metrics_segments import SegmentedLog, segment_lines

LEDGER = "goodput.jsonl"
LEDGER_SEGMENTS = "goodput"  # on an object store: the ledger's segments, RUN_DIR/goodput/
PARTS = (
    "productive", "compile", "data", "eval", "checkpoint_save", "checkpoint_restore", "startup",
    "rollback_discarded", "restart_replayed", "lost", "other",
)  # fmt: skip
PHASE_PARTS = {
    "startup": "startup",
    "restore": "checkpoint_restore",
    "rollback": "checkpoint_restore",
    "step": "productive",
    "eval": "eval",
    "checkpoint": "checkpoint_save",
    "other": "other",
}


class GoodputClock:
    def __init__(
        self, path: Path | None, lines: list[dict[str, Any]], now: float, log_every: int = 1
    ):
        """``path``: the ledger this process appends to (None: another process writes it);
        ``lines``: its records so far; ``now``: this attempt's start (time.time());
        ``log_every``: steps between two lines while only steps run."""
        self.path, self.log_every = path, log_every
        self._segments: SegmentedLog | None = None  # the ledger on an object store
        self.began = lines[0]["t"] - lines[0]["wall"] if lines else now
        self.parts = dict.fromkeys(PARTS, 0.0)
        self._at_checkpoint: dict[int, float] = {}  # step -> productive seconds when saved
        self._phase, self._since, self._step = "startup", now, 0
        self._steps_this_attempt = 0
        if lines:  # a restart: the time until now went somewhere, or was lost
            self.parts.update(lines[-1]["parts"])
            self.parts["lost"] += now - lines[-1]["t"]
            for line in lines:  # a step saved again after a rollback: the newest line wins
                if line.get("saved"):
                    self._at_checkpoint[line["step"]] = line["parts"]["productive"]

    @classmethod
    def open(cls, run_dir: str | Path, write: bool = True, log_every: int = 1) -> GoodputClock:
        """The clock of a new attempt on ``run_dir`` (a fresh run, or a restart). On an object
        store (no appends) the ledger's lines go into segments ``RUN_DIR/goodput/*.jsonl``
        (:class:`flaxlm.train.metrics_segments.SegmentedLog`), written at every checkpoint's
        line, at most every few seconds otherwise, and at the end."""
        now = time.time()
        if not storage.is_posix(str(run_dir)):
            lines = _parsed(segment_lines(str(run_dir), LEDGER_SEGMENTS))
            clock = cls(None, lines, now, log_every)
            if write:
                clock._segments = SegmentedLog(str(run_dir), LEDGER_SEGMENTS)
                clock._segments.open(lambda kept: kept)  # the ledger is never truncated
            return clock
        path = Path(run_dir) / LEDGER
        return cls(path if write else None, _read(path), now, log_every)

    def resumed(self, step: int) -> None:
        """The attempt starts from ``step`` (0: fresh): productive time after the checkpoint
        of ``step`` was lost with the kill and will be trained again. A fresh start's
        initialisation (its compilation included) counts as startup, not as a restore."""
        if step == 0:
            self._phase = "startup"
        self._book(time.time())
        self._step = step
        self._undo_to(step, "restart_replayed")

    def enter(self, phase: str, step: int) -> None:
        """``phase`` (a key of :data:`PHASE_PARTS`) begins at ``step``; the time since the
        last phase change goes to the part of the phase that ran."""
        now = time.time()
        self._book(now)
        write = phase != "step" or self._phase != "step" or step % self.log_every == 0
        if phase == "step":
            self._steps_this_attempt += 1
        self._phase, self._step = phase, step
        if write:
            self._write(now)

    def data_wait(self, seconds: float) -> None:
        """The device waited ``seconds`` for the host's batch, inside the current phase."""
        self._book(time.time())
        moved = min(seconds, self.parts[self._part()])
        self.parts[self._part()] -= moved
        self.parts["data"] += moved

    def saved(self, step: int) -> None:
        """A checkpoint of ``step`` was written: a later restore of it keeps the productive
        time so far."""
        now = time.time()
        self._book(now)
        self._at_checkpoint[step] = self.parts["productive"]
        self._write(now, saved=True)

    def rolled_back(self, step: int) -> None:
        """The run went back to the checkpoint of ``step``: the steps since are discarded."""
        self._book(time.time())
        self._undo_to(step, "rollback_discarded")

    def fraction(self) -> float:
        """Productive time over the wall-clock time since the run began (restarts
        included)."""
        now = time.time()
        self._book(now)
        return self.parts["productive"] / max(now - self.began, 1e-9)

    def close(self) -> None:
        """The end of this attempt: the last phase's time, one last line."""
        self.enter("other", self._step)
        if self._segments is not None:
            self._segments.flush()

    def _part(self) -> str:
        """The part the running phase's time goes to: the first step of an attempt compiles."""
        if self._phase == "step" and self._steps_this_attempt == 1:
            return "compile"
        return PHASE_PARTS[self._phase]

    def _book(self, now: float) -> None:
        self.parts[self._part()] += now - self._since
        self._since = now

    def _undo_to(self, step: int, part: str) -> None:
        kept = self._at_checkpoint.get(step, self.parts["productive"]) if step else 0.0
        moved = max(self.parts["productive"] - kept, 0.0)
        self.parts["productive"] -= moved
        self.parts[part] += moved

    def _write(self, now: float, saved: bool = False) -> None:
        """One ledger line, the time booked up to ``now``."""
        if self.path is None and self._segments is None:
            return
        wall = now - self.began
        record: dict[str, Any] = {
            "t": now, "step": self._step, "wall": wall,
            "goodput": self.parts["productive"] / max(wall, 1e-9), "parts": dict(self.parts),
        }  # fmt: skip
        if saved:
            record["saved"] = True
        if self._segments is not None:
            self._segments.append(json.dumps(record))
            if saved:  # a restore of this checkpoint reads its line
                self._segments.flush()
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _read(path: Path) -> list[dict[str, Any]]:
    """The ledger's complete lines (a kill may tear the last one)."""
    if not path.exists():
        return []
    return _parsed(path.read_text().splitlines())


def _parsed(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_goodput(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/goodput.jsonl``, oldest first (the last one has the run's
    whole account); [] when the run has none."""
    if not storage.is_posix(str(run_dir)):
        return _parsed(segment_lines(str(run_dir), LEDGER_SEGMENTS))
    return _read(Path(run_dir) / LEDGER)
