"""The throughput meter counts only the time the loop spends stepping (train/throughput.py)."""

from __future__ import annotations

import math

from flaxlm.train.throughput import Throughput


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_is_steps_over_stepping_time_between_completions():
    clock = FakeClock()
    meter = Throughput(tokens_per_step=100, flops_per_step=1e6, peak_flops=1e9, clock=clock)
    clock.now = 5.0  # compilation
    meter.step_done(1)  # the reference: its time holds the compile
    assert meter.rate() == {}
    for step in range(2, 11):
        clock.now += 0.5
        meter.step_done(step)
    rate = meter.rate()
    assert math.isclose(rate["tokens_per_s"], 9 * 100 / 4.5)  # steps 2..10 in 4.5 s
    assert math.isclose(rate["mfu"], 9 * 1e6 / 4.5 / 1e9)
    assert meter.rate() == {}  # nothing new since


def test_an_eval_or_a_save_between_logs_does_not_count():
    """The regression: a step that finished during an evaluation was credited with no time,
    so the demo logged 1.3 M tokens/s at eval steps; the real rate was ~10 k."""
    clock = FakeClock()
    meter = Throughput(tokens_per_step=10, flops_per_step=1.0, clock=clock)
    meter.step_done(0)
    clock.now = 1.0
    meter.step_done(1)
    clock.now = 2.0
    meter.step_done(2)  # waited for at the pause: the step in flight ends on the clock
    meter.pause()
    clock.now = 32.0  # a 30 s evaluation
    meter.resume()
    meter.step_done(2)  # its metrics are read after the eval: counted once, at its real end
    clock.now = 33.0
    meter.step_done(3)
    rate = meter.rate()
    assert math.isclose(rate["tokens_per_s"], 3 * 10 / 3.0)  # 3 steps, 3 s of stepping
    assert "mfu" not in rate  # no peak measured


def test_a_rollback_restarts_the_window():
    clock = FakeClock()
    meter = Throughput(tokens_per_step=1, flops_per_step=1.0, clock=clock)
    for step in (1, 2, 3):
        clock.now += 1.0
        meter.step_done(step)
    meter.restart()  # back to step 1: step numbers repeat
    clock.now += 10.0  # the restore
    meter.step_done(2)  # the reference again
    clock.now += 2.0
    meter.step_done(3)
    assert math.isclose(meter.rate()["tokens_per_s"], 1 / 2.0)
