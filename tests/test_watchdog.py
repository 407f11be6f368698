"""The hang watchdog stops a stalled process with a message naming the step and phase."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import REPO

from flaxlm.train import watchdog
from flaxlm.train.watchdog import EXIT_CODE, Watchdog


def test_limit_follows_the_median_step():
    dog = Watchdog(factor=10, min_seconds=0.5)
    assert dog.limit() == 0.5
    for _ in range(5):
        dog.enter("step", 1)
        time.sleep(0.01)
    dog.enter("eval", 5)
    assert 0.5 <= dog.limit() < 1.0  # 10 x ~0.01 s is below the floor
    dog._recent.extend([1.0] * 20)
    assert dog.limit() == 10.0


def test_compiling_phases_are_not_timed():
    dog = Watchdog(factor=10, min_seconds=0.5)
    timed = []
    for phase, step in [
        ("step", 1),
        ("step", 2),
        ("step", 3),
        ("eval", 3),
        ("eval", 6),
        ("rollback", 7),
        ("step", 5),
        ("step", 6),
        ("step", 7),
        ("compile", 7),
    ]:
        dog.enter(phase, step)
        timed.append(dog.current_limit() is not None)
    # The first two steps after the start and after the rollback, and the first eval compile.
    assert timed == [False, False, True, False, True, True, False, False, True, False]  # fmt: skip


def test_no_limit_before_a_step_time_is_known_when_min_seconds_is_zero():
    dog = Watchdog(factor=50, min_seconds=0)
    dog.enter("checkpoint", 0)
    assert dog.current_limit() is None  # was 0 s: every phase exited 75
    for step in range(1, 5):
        dog.enter("step", step)
    assert dog.current_limit() is not None and dog._recent


def test_a_slow_compile_passes_and_a_slow_step_after_it_fires(monkeypatch):
    fired = []
    monkeypatch.setattr(watchdog.os, "_exit", fired.append)
    with Watchdog(factor=2, min_seconds=0.2, poll_seconds=0.05) as dog:
        dog.enter("step", 1)
        time.sleep(0.5)  # compiling: longer than the limit, not timed
        dog.enter("step", 2)
        time.sleep(0.3)
        for step in range(3, 7):
            dog.enter("step", step)
            time.sleep(0.01)
        assert not fired
        dog.enter("step", 7)
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            time.sleep(0.05)
    assert fired[0] == EXIT_CODE


def test_a_stalled_step_exits_non_zero_naming_it(small_corpus, tiny_cache_dir, tmp_path):
    cmd = [
        sys.executable, "-m", "flaxlm.train.chaos", str(REPO / "configs" / "gpt_tiny.yaml"),
        f"data.paths=[{small_corpus}]", f"data.cache_dir={tiny_cache_dir}",
        "data.val_fraction=0.34", f"train.run_dir={tmp_path / 'run'}", "train.steps=40",
        "train.eval_every=0", "chaos.hang_at_steps=[12]",
        "train.watchdog_factor=20", "train.watchdog_min_s=6",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == EXIT_CODE, proc.stderr[-2000:]
    assert "flaxlm watchdog: step at step 12 has run" in proc.stderr
    assert time.monotonic() - start < 120
