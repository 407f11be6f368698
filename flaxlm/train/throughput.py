"""Honest tokens/s and MFU: each logged rate is the rate of the steps it covers.

The loop reads a step's metrics one step late (the device never waits for the host), and it
stops stepping to evaluate, save a checkpoint or roll back. Dividing "steps since the last log"
by "wall time since the last log" would credit a step that finished during an evaluation with
no time at all (the demo once logged many times its real rate at eval steps: benchmarks/RESULTS.md,
"Throughput meter").
So the meter keeps a clock that runs only while the loop is stepping: the loop waits for the
step in flight and *pauses* the clock before an eval or a save, and *resumes* it after. A
step's completion time is read on that clock when its metrics are read (or when it is waited
for at a pause), and a window's rate is its steps over the clock time between the completion
of the step before the window and of its last step. The first step after a start or a
rollback only sets the reference point: its time holds the compilation or the restore.
Under a batch ramp (``train.batch_ramp``) a step counts as the share of the full batch it
trained on, so tokens/s and MFU follow the rows actually in each batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Throughput:
    """Tokens/s and MFU between logged steps, on a clock that runs only while stepping."""

    def __init__(
        self,
        tokens_per_step: float,
        flops_per_step: float,
        peak_flops: float = float("nan"),
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
        self.peak_flops, self.clock = peak_flops, clock
        self._active = 0.0  # clock seconds spent stepping before the current stretch
        self._since: float | None = clock()  # start of the current stretch; None = paused
        # (step, active time, full batches so far) the window starts at, and of the newest
        # completed step
        self._ref: tuple[int, float, float] | None = None
        self._last: tuple[int, float, float] | None = None
        self._run = [0.0, 0.0]  # full batches and clock seconds of every window so far

    def _now(self) -> float:
        running = self.clock() - self._since if self._since is not None else 0.0
        return self._active + running

    def pause(self) -> None:
        """Stops the clock (before an eval, a save, a rollback)."""
        if self._since is not None:
            self._active, self._since = self._now(), None

    def resume(self) -> None:
        if self._since is None:
            self._since = self.clock()

    def step_done(self, step: int, batch_share: float = 1.0) -> None:
        """Step ``step`` has finished (its metrics were read); it trained ``batch_share`` of
        the full batch (a ramp's smaller batch: < 1). A step already seen is ignored, so
        waiting for a step at a pause and reading it later counts it once."""
        if self._last is not None and step <= self._last[0]:
            return
        done = (self._last[2] if self._last is not None else 0.0) + batch_share
        self._last = (step, self._now(), done)
        if self._ref is None:
            self._ref = self._last

    def rate(self) -> dict[str, float]:
        """``tokens_per_s`` (and ``mfu`` when the peak is known) of the steps completed since
        the previous call; empty when there are none."""
        if self._ref is None or self._last is None or self._last[0] <= self._ref[0]:
            return {}
        steps = self._last[2] - self._ref[2]  # in full batches
        seconds = max(self._last[1] - self._ref[1], 1e-9)
        self._ref = self._last
        self._run[0] += steps
        self._run[1] += seconds
        return self._rates(steps, seconds)

    def overall(self) -> dict[str, float]:
        """``tokens_per_s`` (and ``mfu``) over every window :meth:`rate` has reported in
        this process (across rollbacks): the run's mean, steadier than any one window."""
        return self._rates(*self._run) if self._run[1] > 0 else {}

    def _rates(self, steps: float, seconds: float) -> dict[str, float]:
        seconds = max(seconds, 1e-9)
        out = {"tokens_per_s": steps * self.tokens_per_step / seconds}
        if self.peak_flops == self.peak_flops:  # not NaN
            out["mfu"] = steps * self.flops_per_step / seconds / self.peak_flops
        return out

    def restart(self) -> None:
        """After a rollback: step numbers go back, the next completed step is the reference."""
        self._ref = self._last = None
