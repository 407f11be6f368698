"""The throughput meter counts only the time the loop spends stepping (train/throughput.py)."""

from __future__ import annotations

import math

import pytest

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


def test_the_run_mean_covers_every_window_across_rollbacks_and_pauses():
    """``overall()`` (the done line's mean): all steps of all windows over all their stepping
    time; compilation, restores and evals stay off it."""
    clock = FakeClock()
    meter = Throughput(tokens_per_step=10, flops_per_step=2.0, peak_flops=4.0, clock=clock)
    assert meter.overall() == {}
    clock.now = 7.0  # compilation
    meter.step_done(1)
    for step, dt in ((2, 1.0), (3, 3.0)):  # a 1 s and a 3 s window
        clock.now += dt
        meter.step_done(step)
        meter.rate()
    meter.restart()
    clock.now += 10.0  # the restore after a rollback: the new reference
    meter.step_done(2)
    meter.pause()
    clock.now += 30.0  # an evaluation
    meter.resume()
    clock.now += 2.0
    meter.step_done(3)
    assert math.isclose(meter.rate()["tokens_per_s"], 10 / 2.0)
    run = meter.overall()  # 3 steps in 1 + 3 + 2 s
    assert math.isclose(run["tokens_per_s"], 3 * 10 / 6.0)
    assert math.isclose(run["mfu"], 3 * 2.0 / 6.0 / 4.0)


def test_logged_lines_name_the_peak_their_mfu_divides_by(monkeypatch):
    """metrics.jsonl: a line with ``mfu`` carries ``peak_flops`` and ``peak_origin``, and the
    MFU is the step's model FLOPs over that peak (the meter's clock is faked)."""
    from conftest import REPO

    from flaxlm.config import load_config
    from flaxlm.data.batch_ramp import BatchRamp
    from flaxlm.families import family_of
    from flaxlm.runtime.peaks import Peak
    from flaxlm.train import reporter
    from flaxlm.train.flops import flops_per_token

    cfg = load_config(REPO / "configs/gpt_tiny.yaml", ["train.log_every=1"], check_paths=False)
    monkeypatch.setattr(reporter, "run_peak", lambda devices, dtype: Peak(2e9, "measured:cpu:fp32"))
    lines = []
    log = type("Log", (), {"write": lambda self, record: lines.append(record)})()
    ramp = BatchRamp([], cfg.train.batch_size)
    report = reporter.StepReporter(cfg, family_of(cfg), log, True, 0, 3, ramp)
    clock = FakeClock()
    report.meter.clock, report.meter._since = clock, 0.0
    metrics = {"loss": 2.0, "accuracy": 0.5, "lr": 1e-3, "grad_norm": 1.0}
    for step in (1, 2, 3):
        clock.now = float(step)  # one second per step
        report.step_done(step, metrics)
    report.close()
    tokens = cfg.train.batch_size * cfg.data.seq_len
    expected = flops_per_token(cfg.model, cfg.data.seq_len) * tokens / 2e9
    assert lines[-1]["mfu"] == pytest.approx(expected)
    assert (lines[-1]["peak_flops"], lines[-1]["peak_origin"]) == (2e9, "measured:cpu:fp32")
    assert "peak_origin" not in lines[0]  # the first step only sets the reference: no rate
