"""Real multi-process training on one machine: 2 processes x 2 CPU devices joined through
jax.distributed by launch/local.sh, against one process with 4 devices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tiny_config, unoptimized_env

from flaxlm.train import train

LAUNCHER = REPO / "launch" / "local.sh"


def _train_cmd(corpus, cache, run_dir, steps=6):
    return [
        sys.executable, "-m", "flaxlm.cli", "train", str(REPO / "configs" / "gpt_tiny.yaml"),
        f"data.paths=[{corpus}]", f"data.cache_dir={cache}", "data.val_fraction=0.34",
        f"train.run_dir={run_dir}", f"train.steps={steps}", "train.eval_every=3",
        "checkpoint.every=3",
    ]  # fmt: skip


def _run(cmd, env_extra, timeout=240):
    # Six steps: compiling is the cost, so the trainers compile unoptimized (conftest.py).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | unoptimized_env()
    env |= env_extra
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _metrics(run_dir: Path):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], [
        r["val_loss"] for r in lines if "val_loss" in r
    ]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="launch/local.sh needs bash")
@pytest.mark.usefixtures("unoptimized_compiles")
def test_two_processes_match_one_process_and_restore_into_one(
    small_corpus, tiny_cache_dir, tmp_path
):
    multi = tmp_path / "multi"
    proc = _run(
        ["bash", str(LAUNCHER), "--devices-per-process", "2", "2",
         *_train_cmd(small_corpus, tiny_cache_dir, multi)],
        {},
    )  # fmt: skip
    # Only process 0 reports.
    assert proc.stdout.count("done: step 6") == 1, proc.stdout

    single = tmp_path / "single"
    _run(_train_cmd(small_corpus, tiny_cache_dir, single), {"FLAXLM_LOCAL_DEVICES": "4"})
    multi_losses, multi_val = _metrics(multi)
    single_losses, single_val = _metrics(single)
    assert len(multi_losses) == 6
    np.testing.assert_allclose(multi_losses, single_losses, rtol=0, atol=1e-5)
    np.testing.assert_allclose(multi_val, single_val, rtol=0, atol=1e-5)

    # The checkpoint the two processes wrote restores into this one process (1 device) and
    # training continues from it.
    cfg = tiny_config(
        small_corpus, tiny_cache_dir, multi, "train.steps=9", "train.eval_every=0",
        "checkpoint.every=3",
    )  # fmt: skip
    result = train(cfg)
    assert result.resumed_from == 6 and result.step == 9
    assert all(np.isfinite(r["loss"]) for r in result.history)
    assert result.history[0]["loss"] < multi_losses[0]  # it kept the trained weights


def test_launcher_dry_run_and_failure_propagation(tmp_path):
    out = subprocess.run(
        ["bash", str(LAUNCHER), "--dry-run", "--devices-per-process", "2", "3", "echo", "hi"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert len(out) == 3
    assert "FLAXLM_NUM_PROCESSES=3" in out[0] and "FLAXLM_PROCESS_ID=2" in out[2]
    # One process failing stops the run with its exit code instead of hanging.
    script = tmp_path / "worker.sh"
    script.write_text('if [ "$FLAXLM_PROCESS_ID" = 1 ]; then exit 7; fi; sleep 60\n')
    proc = subprocess.run(
        ["bash", str(LAUNCHER), "2", "bash", str(script)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 7
    assert "a process failed (exit 7)" in proc.stderr
