"""Weights & Biases logging: every metrics.jsonl record also goes to one W&B run.

    pip install 'flaxlm[wandb]'
    flaxlm train configs/gpt_demo.yaml logging.wandb=true              # offline: wandb sync later
    flaxlm train configs/gpt_demo.yaml logging.wandb=true logging.wandb_mode=online

Only process 0 logs. The run's id is kept in ``RUN_DIR/wandb.json``, so a resume of the run dir
(after a kill, a preemption or a longer ``train.steps``) continues the same W&B run.

Steps: a rollback (or a resume from a checkpoint older than the last logged step) replays steps
that W&B has already seen, and W&B drops any record whose step is not above the last one. So
the W&B step only counts records, always upward, also across restarts (``wandb.json`` keeps the
count, so offline attempts of one run never overlap and ``wandb sync --append`` joins them),
and the charts' x-axis is ``train/step``, the training step. Train records are logged as
``train/<key>``, evaluations as ``eval/<key>``, a list (each expert's load) as one scalar per
entry; events (rollbacks, stops, accepted config changes) go to an ``events`` table and the
serious ones also to a W&B alert. A W&B failure never stops training: one warning, and W&B
logging is off for the rest of the invocation (metrics.jsonl still gets everything).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from flaxlm.config import Config, ConfigError, to_dict

STATE_FILE = "wandb.json"  # {"id": the W&B run id, "next_step": the next W&B step}
EVENT_COLUMNS = ["step", "event", "details"]
ALERTS = {"rollback": "WARN", "stopped": "ERROR", "eval_not_finite": "WARN"}


def import_wandb() -> Any:
    """The ``wandb`` module; a ConfigError naming the extra to install when it is missing."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "logging.wandb=true needs the wandb package: pip install 'flaxlm[wandb]' "
            "(or set logging.wandb=false)"
        ) from None
    return wandb


class WandbLog:
    """One W&B run for ``cfg.train.run_dir``. ``module`` is the ``wandb`` module (tests pass a
    stand-in). Nothing happens until :meth:`start`."""

    def __init__(self, cfg: Config, module: Any):
        self.cfg, self._wandb = cfg, module
        self.run_dir = Path(cfg.train.run_dir)
        self.state_path = self.run_dir / STATE_FILE
        self.run_id: str | None = None
        self.next_step = 0  # the W&B step of the next record
        self._run: Any = None
        self._events: list[list[Any]] = []

    @classmethod
    def for_run(cls, cfg: Config, is_main: bool) -> WandbLog | None:
        """The logger of a training process: None unless ``logging.wandb`` and process 0.
        Every process checks that wandb is installed, so all of them fail alike."""
        if not cfg.logging.wandb:
            return None
        module = import_wandb()
        return cls(cfg, module) if is_main else None

    @property
    def active(self) -> bool:
        return self._run is not None

    def start(self, kept: Sequence[dict[str, Any]] = ()) -> None:
        """Starts or continues the run dir's W&B run. ``kept``: the metrics.jsonl records the
        resumed run keeps; their events are the first rows of the events table."""
        self._events = [_event_row(r) for r in kept if "event" in r]
        self._guarded("start", self._start)

    def _start(self) -> None:
        saved = _read_state(self.state_path)
        self.run_id = saved.get("id") or secrets.token_hex(6)
        self.next_step = int(saved.get("next_step", 0))
        self._save_state()  # before init: a kill during init still finds the same id
        lc = self.cfg.logging
        kwargs: dict[str, Any] = {
            "project": lc.wandb_project,
            "entity": lc.wandb_entity or None,
            "name": lc.wandb_name or self.run_dir.resolve().name,
            "tags": list(lc.wandb_tags) or None,
            "id": self.run_id,
            "resume": "allow",
            "dir": os.environ.get("WANDB_DIR") or str(self.run_dir),
            "reinit": "create_new",  # never touches another run of this process (a sweep's)
        }
        if not os.environ.get("WANDB_MODE"):
            kwargs["mode"] = lc.wandb_mode
        run = self._wandb.init(**kwargs)
        self._run = run
        run.config.update(to_dict(self.cfg), allow_val_change=True)
        run.define_metric("train/step")
        run.define_metric("*", step_metric="train/step")
        # Online, a resumed run knows how many steps the server holds.
        self.next_step = max(self.next_step, int(getattr(run, "step", 0) or 0))

    def write(self, record: dict[str, Any]) -> None:
        """Logs one metrics.jsonl record (plain JSON values; non-finite numbers are None)."""
        if self._run is not None:
            self._guarded("log", self._log, record)

    def _log(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        event = record.get("event")
        if event is not None:
            self._events.append(_event_row(record))
            data = {"events": self._wandb.Table(columns=EVENT_COLUMNS, data=list(self._events))}
        else:
            prefix = "eval" if "val_loss" in record else "train"
            data = dict(_scalars(prefix, record))
        data["train/step"] = step
        wandb_step = self.next_step
        self.next_step += 1
        self._save_state()  # first: a kill after the log leaves a gap, never a repeat
        self._run.log(data, step=wandb_step)
        if event in ALERTS:
            text = record.get("reason") or json.dumps(record)
            self._run.alert(title=f"{event} at step {step}", text=str(text), level=ALERTS[event])
        if event == "stopped":  # the trainer raises next: the run ends failed
            self._finish({"stopped": True}, exit_code=1)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        """Ends the run with ``summary`` (and the number of rollbacks) in its W&B summary."""
        if self._run is not None:
            self._guarded("finish", self._finish, summary)

    def _finish(self, summary: dict[str, Any] | None, exit_code: int = 0) -> None:
        run, self._run = self._run, None
        rollbacks = sum(row[1] == "rollback" for row in self._events)
        run.summary.update({"rollbacks": rollbacks, **(summary or {})})
        run.finish(exit_code=exit_code)

    def _guarded(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        """Runs ``fn``; a failure is one warning and turns W&B off, never an exception."""
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            warnings.warn(
                f"W&B {what} failed ({type(exc).__name__}: {message}); W&B logging is off for "
                "the rest of this run, metrics.jsonl has every record",
                stacklevel=3,
            )
            run, self._run = self._run, None
            if run is not None:
                with contextlib.suppress(Exception):
                    run.finish(exit_code=1)

    def _save_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"id": self.run_id, "next_step": self.next_step}))
        tmp.replace(self.state_path)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def _scalars(prefix: str, record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """``(prefix/key, value)`` for the finite numbers of a record; a list is one per entry."""
    for key, value in record.items():
        values = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, v in values:
            if key == "step" or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if math.isfinite(v):
                yield (f"{prefix}/{key}" if i is None else f"{prefix}/{key}/{i}"), v


def _event_row(record: dict[str, Any]) -> list[Any]:
    details = {k: v for k, v in record.items() if k not in ("step", "event")}
    return [record.get("step", 0), record["event"], json.dumps(details)]
