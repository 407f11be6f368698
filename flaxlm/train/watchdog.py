"""Hang watchdog: a stuck step (e.g. a collective waiting on a dead host, a known JAX
multi-host failure mode) would otherwise block forever. The loop reports each phase it
enters; a background thread stops the process with a clear message when a phase runs far
longer than the recent median step, so the scheduler restarts the job from its checkpoint.

Compilation is never timed: the first steps after a start or a rollback and the first
evaluation may compile (minutes for a large model on a pod), and their time says nothing about
a hang. Nor does the watchdog fire before it knows a step time, unless ``min_seconds`` says
how long anything may take.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections import deque

EXIT_CODE = 75  # EX_TEMPFAIL: "try again", what a scheduler should do
# Step phases after a (re)start that may compile: the first dispatches the compile, the
# second waits for the first's (first) execution. Neither is timed nor enters the median.
COMPILING_STEPS = 2
RESTARTS = ("rollback",)  # phases after which the next steps may compile again
COMPILES_ONCE = ("eval",)  # phases whose first run compiles (the eval step)


class Watchdog:
    def __init__(self, factor: float, min_seconds: float, poll_seconds: float = 1.0):
        self.factor, self.min_seconds, self.poll = factor, min_seconds, poll_seconds
        self.enabled = factor > 0
        self._recent: deque[float] = deque(maxlen=50)
        self._phase, self._step, self._since = "start", 0, time.monotonic()
        self._timed = False  # whether the current phase is timed
        self._steps_since_start = 0  # step phases entered since the start or last rollback
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def limit(self) -> float:
        """Seconds a timed phase may take: factor x the median recent step, at least
        min_seconds."""
        median = statistics.median(self._recent) if self._recent else 0.0
        return max(self.factor * median, self.min_seconds)

    def current_limit(self) -> float | None:
        """The limit of the phase running now; None while it may be compiling, or while no
        step time is known and ``min_seconds`` is 0."""
        with self._lock:
            return self._current_limit()

    def _current_limit(self) -> float | None:
        if not self._timed or (not self._recent and self.min_seconds <= 0):
            return None
        return self.limit()

    def enter(self, phase: str, step: int) -> None:
        """The loop starts ``phase`` ("step", "eval", "checkpoint", "rollback", "compile":
        never timed) at ``step``."""
        now = time.monotonic()
        with self._lock:
            if self._phase == "step" and self._timed:
                self._recent.append(now - self._since)
            if phase in RESTARTS:
                self._steps_since_start = 0
            timed = phase != "compile"
            if phase == "step":
                self._steps_since_start += 1
                timed = self._steps_since_start > COMPILING_STEPS
            elif phase in COMPILES_ONCE:
                timed = phase in self._seen
            self._seen.add(phase)
            self._phase, self._step, self._since, self._timed = phase, step, now, timed

    def __enter__(self) -> Watchdog:
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="flaxlm-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            with self._lock:
                phase, step, elapsed = self._phase, self._step, time.monotonic() - self._since
                limit = self._current_limit()
            if limit is not None and elapsed > limit:
                print(
                    f"flaxlm watchdog: {phase} at step {step} has run {elapsed:.0f}s "
                    f"(limit {limit:.0f}s = max({self.factor:g} x median step, "
                    f"{self.min_seconds:g}s)); exiting with code {EXIT_CODE} so the job can "
                    "be restarted from its last checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                # A hung collective cannot be interrupted from Python: leave at once.
                os._exit(EXIT_CODE)
