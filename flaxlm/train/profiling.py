"""Profiler traces and named phases: what a team looks at first on a new pod.

    profiler = StepProfiler.for_run(cfg, run_dir, jax.process_index())
    profiler.enter("step", 5)     # a StepTraceAnnotation "train" with step_num=5
    with profiler.data():         # a TraceAnnotation "data" around the batch's assembly
        ...
    profiler.close()

With ``train.profile_steps: [start, stop]`` a ``jax.profiler`` trace covers steps start to
stop: it starts before step ``start`` is dispatched and stops once step ``stop`` has finished
on the device (the loop reads a step's metrics one step later), and lands as
``RUN_DIR/profile/plugins/profile/<time>/<host>.xplane.pb``, the layout TensorBoard's profile
plugin and XProf open (``tensorboard --logdir RUN_DIR/profile`` or ``xprof RUN_DIR/profile``).
Each host writes its own file; ``train.profile_hosts`` limits tracing to those process indices.

The phases are annotated on every run, traced or not (an annotation costs nothing while no
trace is being taken, and a trace taken from outside, through ``jax.profiler.start_server``,
shows them too): each train step as a ``StepTraceAnnotation`` named ``train`` with its step
number (XProf's step-time view groups by it), and ``eval``, ``checkpoint``, ``rollback`` and
``data`` (assembling the next batch) as ``TraceAnnotation`` ranges.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from flaxlm import storage
from flaxlm.config import Config

TRACE_DIR = "profile"  # under the run dir
STEP_NAME = "train"  # the StepTraceAnnotation of each train step


class StepProfiler:
    """Names the loop's phases in traces and takes the trace of ``train.profile_steps``."""

    def __init__(self, steps: list[int], log_dir: str | None):
        """``steps``: [start, stop] or []; ``log_dir``: where this host writes its trace (a
        folder, or an object-store URL where jax's profiler can write one), None when it
        takes none."""
        self.start, self.stop = (steps[0], steps[1]) if steps else (0, -1)
        self.log_dir = log_dir if steps else None
        self.tracing = False
        self._open: Any = None  # the annotation of the phase running now

    @classmethod
    def for_run(cls, cfg: Config, run_dir: str | Path, process_index: int) -> StepProfiler:
        """This process's profiler: it traces when ``train.profile_steps`` is set and
        ``train.profile_hosts`` is empty (all hosts) or names it."""
        hosts, steps = cfg.train.profile_hosts, list(cfg.train.profile_steps)
        traces = bool(steps) and (not hosts or process_index in hosts)
        return cls(steps, storage.join(str(run_dir), TRACE_DIR) if traces else None)

    def enter(self, phase: str, step: int) -> None:
        """The loop starts ``phase`` (``step`` = the step about to be dispatched, or the step
        an eval / checkpoint / rollback belongs to): the previous phase's range ends."""
        self._close_phase()
        if self.log_dir is not None and phase == "step":
            if not self.tracing and self.start <= step <= self.stop:
                storage.make_dirs(self.log_dir)
                jax.profiler.start_trace(self.log_dir)
                self.tracing = True
            elif self.tracing and step > self.stop + 1:  # step `stop` was read in the last one
                self._stop_trace()
        if phase == "step":
            self._open = jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=step)
        else:
            self._open = jax.profiler.TraceAnnotation(phase)
        self._open.__enter__()

    @contextlib.contextmanager
    def data(self) -> Iterator[None]:
        """A ``data`` range inside the current phase: the host assembling a batch."""
        with jax.profiler.TraceAnnotation("data"):
            yield

    def close(self) -> None:
        """The end of the run (or of this invocation): the last range and any trace end."""
        self._close_phase()
        if self.tracing:
            self._stop_trace()

    def _close_phase(self) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None

    def _stop_trace(self) -> None:
        jax.profiler.stop_trace()
        self.tracing = False
        self.log_dir = None  # one trace per invocation


def trace_files(log_dir: str | Path) -> list[Path]:
    """The ``*.xplane.pb`` files under ``log_dir`` (a run's ``profile/`` or a bench's), oldest
    first."""
    return sorted(Path(log_dir).rglob("*.xplane.pb"), key=lambda p: (p.stat().st_mtime, p))


def annotation_names(xplane: str | Path) -> dict[str, int]:
    """How often each host-side event name occurs in a ``.xplane.pb`` trace, read with JAX's
    own XSpace reader (``jax.profiler.ProfileData``, no TensorFlow needed)."""
    from jax.profiler import ProfileData

    counts: dict[str, int] = {}
    for plane in ProfileData.from_file(str(xplane)).planes:
        for line in plane.lines:
            for event in line.events:
                counts[event.name] = counts.get(event.name, 0) + 1
    return counts
