"""Hang watchdog: a stuck step (e.g. a collective waiting on a dead host, a known JAX
multi-host failure mode) would otherwise block forever. The loop reports each phase it
enters; a background thread stops the process with a clear message when a phase runs far
longer than the recent median step, so the scheduler restarts the job from its checkpoint."""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections import deque

EXIT_CODE = 75  # EX_TEMPFAIL: "try again", what a scheduler should do


class Watchdog:
    def __init__(self, factor: float, min_seconds: float, poll_seconds: float = 1.0):
        self.factor, self.min_seconds, self.poll = factor, min_seconds, poll_seconds
        self.enabled = factor > 0
        self._recent: deque[float] = deque(maxlen=50)
        self._phase, self._step, self._since = "start", 0, time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def limit(self) -> float:
        """Seconds a phase may take: factor x the median recent step, at least min_seconds."""
        median = statistics.median(self._recent) if self._recent else 0.0
        return max(self.factor * median, self.min_seconds)

    def enter(self, phase: str, step: int) -> None:
        """The loop starts ``phase`` ("step", "eval", "checkpoint", ...) at ``step``."""
        now = time.monotonic()
        with self._lock:
            if self._phase == "step":
                self._recent.append(now - self._since)
            self._phase, self._step, self._since = phase, step, now

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
            limit = self.limit()
            if elapsed > limit:
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
