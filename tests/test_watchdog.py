"""The hang watchdog stops a stalled process with a message naming the step and phase."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import REPO

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


def test_a_stalled_step_exits_non_zero_naming_it(small_corpus, tiny_cache_dir, tmp_path):
    cmd = [
        sys.executable, "-m", "flaxlm.cli", "train", str(REPO / "configs" / "gpt_tiny.yaml"),
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
