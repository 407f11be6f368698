"""The training loop, read top to bottom: data, model, state (fresh or resumed), then steps.

    from flaxlm.config import load_config
    from flaxlm.train import train
    result = train(load_config("configs/gpt_demo.yaml", ["train.steps=200"]))

Each step: batch -> step -> guard -> log -> checkpoint -> eval -> preemption. The device never
waits for the host: step k+1 is dispatched before the metrics of step k are read, and the next
batch is assembled on the host while the current step runs. A bad step (flaxlm/train/guard_rules.py)
rolls the run back to the newest known-good checkpoint, and the data since then goes into the
skip ledger. The collaborators each own their state: the model and jitted steps
(program.py), checkpoints with the run's position (run_checkpoints.py), the guard's state
(guard_state.py), the step's dispatch with its LR factor (controls.py; the chaos harness
in chaos.py swaps in its fault-injecting one), evaluation (evaluator.py), metrics and progress
(reporter.py), preemption (preemption.py) and the hang watchdog (watchdog.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import yaml

from flaxlm import storage
from flaxlm.config import Config, to_dict
from flaxlm.data import PreparedData, prepare_data
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.families import family_of
from flaxlm.train.batches import put_train_batch
from flaxlm.train.controls import StepControls
from flaxlm.train.evaluator import Evaluator
from flaxlm.train.goodput import GoodputClock
from flaxlm.train.guard_rules import TrainingDiverged
from flaxlm.train.guard_state import GuardState
from flaxlm.train.metrics_log import MetricsLog
from flaxlm.train.preemption import PreemptionGuard
from flaxlm.train.profiling import StepProfiler
from flaxlm.train.program import TrainProgram
from flaxlm.train.reporter import StepReporter, scalars
from flaxlm.train.resume_checks import ResumeCheck, write_fingerprints
from flaxlm.train.run_checkpoints import RunCheckpoints, Start
from flaxlm.train.run_lock import holds_run_lock
from flaxlm.train.wandb_log import WandbLog
from flaxlm.train.watchdog import Watchdog


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # every logged train record
    evals: list[dict[str, Any]] = field(default_factory=list)
    rates: dict[str, Any] = field(default_factory=dict)  # the run's mean tokens/s and MFU
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    preempted: str | None = None  # the signal that stopped the run early, if any
    process_index: int = 0


@dataclass
class _Pending:
    """A dispatched step whose metrics have not been read yet."""

    step: int
    data_index: int
    metrics: Any


@holds_run_lock  # one trainer per run dir: a second one refuses, naming this one
def train(
    cfg: Config, stop_at_step: int | None = None, controls: type[StepControls] = StepControls
) -> TrainResult:
    """Trains (or resumes) the run in ``cfg.train.run_dir`` up to ``cfg.train.steps``.

    ``stop_at_step`` ends this invocation early at that step, with a checkpoint — what a
    preempted job does; running ``train`` again on the same run dir continues from there.
    ``controls`` dispatches each step (controls.py); only the chaos harness
    (flaxlm/train/chaos.py) passes another, which injects the ``chaos.*`` faults.
    Raises :class:`TrainingDiverged` when rollbacks exceed the configured bounds.
    """
    controls.refuse_faults(cfg)  # flaxlm train never injects faults: say so, do not ignore them
    run = _open_run(cfg, stop_at_step, controls)
    state, step, data_index = run.start.state, run.start.step, run.start.data_index
    healing, report, ckpts, last_step = run.healing, run.report, run.ckpts, run.last_step
    pending: _Pending | None = None  # dispatched, metrics not read yet
    next_local = run.next_batch(data_index)
    with PreemptionGuard() as preempt, run.watchdog, run.ending_on_error():
        while True:
            run.phase("step", step + 1)
            finished = step >= last_step or preempt.stop_at(step)
            if finished and pending is None:
                break
            dispatched = None
            if not finished:  # dispatch the next step; its metrics are read one step later
                batch = put_train_batch(next_local, run.ms.mesh, cfg.train.grad_accum)
                state, metrics = run.controls.dispatch(state, batch, step, data_index)
                dispatched = _Pending(step + 1, data_index, metrics)
                step, data_index = step + 1, healing.next_data_index(data_index + 1)
                if step < last_step:  # host work overlaps the step just dispatched
                    next_local = run.next_batch(data_index, in_flight=metrics)
                report.advanced()
            # The guard reads the previous step; before an eval or a save (and when draining)
            # also the one just dispatched, so no checkpoint holds an unchecked step.
            boundary = finished or run.evaluator.due(step) or ckpts.due(step, last_step)
            to_check = [p for p in (pending, dispatched if boundary else None) if p is not None]
            pending = None if boundary else dispatched
            bad = next(((p, r) for p in to_check if (r := _check(p, healing, report))), None)
            if bad is not None:
                run.phase("rollback", bad[0].step)
                with report.paused():
                    state, step, data_index = _roll_back(*bad, run)
                run.goodput.rolled_back(step)
                pending, next_local = None, run.next_batch(data_index)
                continue
            if finished:
                break
            _eval_and_save(run, state, step, data_index)
    report.close()
    run.result.preempted = preempt.signal_name
    return _finish(run, state, step, data_index)


@dataclass
class _Run:
    """The collaborators of one :func:`train` invocation, each owning its state."""

    cfg: Config
    ms: TrainProgram
    batches: Any
    proc: tuple[int, int]  # (process index, process count)
    start: Start
    last_step: int
    ckpts: RunCheckpoints
    healing: GuardState
    controls: StepControls
    evaluator: Evaluator
    log: MetricsLog
    report: StepReporter
    watchdog: Watchdog
    result: TrainResult
    profiler: StepProfiler  # names the phases in traces; train.profile_steps' trace
    goodput: GoodputClock  # where the wall-clock time goes (goodput.jsonl)

    @contextlib.contextmanager
    def ending_on_error(self) -> Iterator[None]:
        """A loop that raises (diverged, a failed save, Ctrl-C twice) still ends its profiler
        trace (else the next trace in this process is refused) and its progress bar."""
        try:
            yield
        except BaseException:
            self.profiler.close()
            self.report.close()
            raise

    def phase(self, name: str, step: int) -> None:
        """The loop enters phase ``name`` at ``step``: the watchdog, the profiler's trace and
        the goodput clock follow it."""
        self.watchdog.enter(name, step)
        self.profiler.enter(name, step)
        self.goodput.enter(name, step)

    def next_batch(self, data_index: int, in_flight: Any = None) -> Any:
        """This process's slice of the batch at data position ``data_index`` (host arrays).
        ``in_flight``: the metrics of the step running meanwhile; when it is done by the time
        the batch is (or none runs), the device waited for the data."""
        began = time.perf_counter()
        with self.profiler.data():
            batch = self.batches.batch(data_index, *self.proc)
        leaves = jax.tree.leaves(in_flight)
        if all(getattr(leaf, "is_ready", lambda: True)() for leaf in leaves):
            self.goodput.data_wait(time.perf_counter() - began)
        return batch


def _open_run(cfg: Config, stop_at_step: int | None, controls: type[StepControls]) -> _Run:
    """Data, model, state (fresh or resumed) and the loop's collaborators."""
    family, run_dir = family_of(cfg), storage.native(cfg.train.run_dir)  # a folder or a URL
    is_main, proc = jax.process_index() == 0, (jax.process_index(), jax.process_count())
    goodput = GoodputClock.open(run_dir, write=is_main, log_every=cfg.train.log_every)
    show = is_main and cfg.train.progress
    wandb = WandbLog.for_run(cfg, is_main)  # logging.wandb: fails now if wandb is missing
    resume = ResumeCheck(cfg)  # refuses a resume that would change the run (resume_checks.py)
    # Data first: it is the slowest thing to fail on, and the tokenizer must fit the model
    # (a resume's is the checkpoint's own).
    data = prepare_data(cfg.data, cfg.model.vocab_size, show, resume.tokenizer)
    resume.check_data(data.fingerprints)
    ramp = BatchRamp.from_config(cfg.train)  # the run's one ramp: batches, schedule, meter
    batches = family.train_batches(data, cfg, ramp)
    ms = TrainProgram.build(cfg, family, ramp=ramp)
    if is_main:  # only now: a refused resume leaves the run's files as they were
        _write_run_files(run_dir, cfg, data)

    # Resume from the newest intact checkpoint of this run dir, or start fresh.
    ckpts = RunCheckpoints(cfg, ms, data.tokenizer.model_bytes)
    goodput.enter("restore", 0)
    start = ckpts.resume_or_start(announce=is_main)
    goodput.resumed(start.step)
    last_step = cfg.train.steps if stop_at_step is None else min(stop_at_step, cfg.train.steps)
    result = TrainResult(run_dir, start.step, resumed_from=start.resumed_from)
    result.process_index = proc[0]
    log = MetricsLog(
        run_dir, is_main, resume_from_step=start.step, keep_lines=start.metrics_lines, wandb=wandb
    )
    resume.record(log, start.step)  # accepted changes: an event in metrics.jsonl
    report = StepReporter(cfg, family, log, show, start.step, last_step, ramp, goodput)
    evaluator = Evaluator(cfg, family, ms.eval_step, ms.mesh, data.val, data.tokenizer)
    watchdog = Watchdog(cfg.train.watchdog_factor, cfg.train.watchdog_min_s)
    return _Run(
        cfg, ms, batches, proc, start, last_step, ckpts, start.healing,
        controls(cfg, ms, start.healing), evaluator, log, report, watchdog, result,
        StepProfiler.for_run(cfg, run_dir, proc[0]), goodput,
    )  # fmt: skip


def _eval_and_save(run: _Run, state: Any, step: int, data_index: int) -> None:
    """The evaluation and the checkpoint due after ``step`` (both checked healthy)."""
    if run.evaluator.due(step):  # before the save: its line belongs to the checkpoint
        run.phase("eval", step)
        with run.report.paused():
            run.result.evals.append(run.report.evaluated(run.evaluator.run(state.params, step)))
    if run.ckpts.due(step, run.last_step):
        run.phase("checkpoint", step)
        with run.report.paused():
            run.log.flush()  # the lines the checkpoint counts are in the run dir
            run.ckpts.save(state, step, data_index, run.healing, run.log.lines)
        run.goodput.saved(step)


def _finish(run: _Run, state: Any, step: int, data_index: int) -> TrainResult:
    """The end: a checkpoint of the last step, a final evaluation, the plots."""
    result, ckpts = run.result, run.ckpts
    if ckpts.latest_step() != step:
        run.phase("checkpoint", step)
        run.log.flush()
        ckpts.save(state, step, data_index, run.healing, run.log.lines)
        run.goodput.saved(step)
    if step == run.cfg.train.steps and (not result.evals or result.evals[-1]["step"] != step):
        run.phase("eval", step)
        final = run.evaluator.run(state.params, step)
        result.evals.append(run.report.evaluated(final, final=True))
    run.phase("checkpoint", step)
    ckpts.close()  # waits until every checkpoint is durable, manifests included
    run.profiler.close()
    run.goodput.close()
    if result.preempted and run.proc[0] == 0:
        print(f"{result.preempted}: checkpoint saved at step {step} in {result.run_dir}; "
              "rerun to resume")  # fmt: skip
    run.log.plot()
    result.rates = run.report.run_rates()
    run.log.close(summary={"step": step, "preempted": result.preempted or "", **result.rates})
    result.step, result.history = step, run.report.history
    return result


def _write_run_files(run_dir: Path | str, cfg: Config, data: PreparedData) -> None:
    """The resolved config, the tokenizer and the data's fingerprints, beside the
    checkpoints (each written whole: flaxlm.storage)."""
    storage.make_dirs(run_dir)
    config = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    storage.write_text(storage.join(run_dir, "config.yaml"), config)
    storage.write_bytes(storage.join(run_dir, "tokenizer.model"), data.tokenizer.model_bytes)
    write_fingerprints(run_dir, data.fingerprints)


def _check(done: _Pending, healing: GuardState, report: StepReporter) -> str | None:
    """Reads a finished step's metrics and logs them; returns why the step is bad, or None."""
    metrics = jax.device_get(done.metrics)
    values = scalars(metrics)
    reason = healing.check(done.step, values["loss"], values["grad_norm"])
    report.step_done(done.step, metrics, force=reason is not None, data_index=done.data_index)
    return reason


def _roll_back(bad: _Pending, reason: str, run: _Run) -> tuple[Any, int, int]:
    """Restores the newest known-good checkpoint before the bad step and puts the data since
    then in the skip ledger; the event is logged and the outcome recorded durably before any
    checkpoint is deleted. Returns (state, step, data index) to continue from."""
    healing, report = run.healing, run.report
    try:
        plan = healing.roll_back(bad.step, bad.data_index, run.ckpts.steps())
    except TrainingDiverged as exc:
        report.log.write({"event": "stopped", "step": bad.step, "reason": f"{reason}; {exc}"})
        raise
    event = {
        "event": "rollback",
        "step": bad.step,
        "restored_step": plan.restore_step,
        "skipped": list(plan.window),
        "reason": reason,
    }
    run.result.rollbacks.append(event)
    report.rolled_back(event, plan.restore_step)
    data_index = healing.next_data_index(plan.restore_data_index)
    report.log.flush()  # the rollback record counts the lines written so far
    state = run.ckpts.roll_back(plan, data_index, healing, report.log.lines)
    return state, plan.restore_step, data_index
