"""kill -9 of a real ``flaxlm train`` process whose run dir is in a bucket (moto on 127.0.0.1),
while its asynchronous saves are being copied up: the rerun resumes from a sealed checkpoint,
finishes, and leaves no half-copied step and one metrics stream without gaps or repeats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import object_stores
import pytest
from conftest import REPO

from flaxlm import storage
from flaxlm.checkpoint.tiers import PersistentTier
from flaxlm.train.metrics_log import read_metrics

s3_server = object_stores.s3_server

pytestmark = pytest.mark.slow  # two real trainer processes


def test_kill_9_during_bucket_saves_then_resume(s3_server, small_corpus, tiny_cache_dir, tmp_path):
    run_dir = object_stores.make_bucket("s3") + "/run"
    argv = [
        sys.executable, "-m", "flaxlm.cli", "train", str(REPO / "configs" / "gpt_tiny.yaml"),
        f"data.paths=[{small_corpus}]", f"data.cache_dir={tiny_cache_dir}",
        "data.val_fraction=0.34", f"train.run_dir={run_dir}", "train.steps=16",
        "train.eval_every=0", "train.log_every=1", "checkpoint.every=2", "checkpoint.keep=2",
    ]  # fmt: skip
    env = {**os.environ, "FLAXLM_CACHE": str(tmp_path / "host"), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    tier = PersistentTier(storage.join(run_dir, "checkpoints"))
    victim = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not tier.steps() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, victim.communicate()[0][-3000:]
    time.sleep(0.3)  # into the next saves: the sealing thread is copying one up
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL  # killed, not finished
    killed_at = max(tier.steps() + tier.unsealed())
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr
    resumed = int(rerun.stdout.split(f"resuming {run_dir} from step ")[1].split()[0])
    assert 2 <= resumed <= killed_at and resumed % 2 == 0
    assert tier.unsealed() == [] and tier.steps()[-1] == 16
    steps = [r["step"] for r in read_metrics(storage.join(run_dir, "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, 17))  # the lost attempt's lines after the checkpoint dropped
