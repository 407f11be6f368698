"""Signals and crashes, with real subprocesses: SIGTERM saves and exits 0, SIGKILL mid-save
leaves a restorable run, and damaged checkpoints are walked past, never restored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_config

from flaxlm.checkpoint import MANIFEST, Checkpointer
from flaxlm.train import train

STEPS = 80


def _overrides(corpus, cache, run_dir, *extra):
    return [
        f"data.paths=[{corpus}]",
        f"data.cache_dir={cache}",
        "data.val_fraction=0.34",
        f"train.run_dir={run_dir}",
        f"train.steps={STEPS}",
        "train.eval_every=0",
        *extra,
    ]


def _start(overrides):
    cmd = [sys.executable, "-m", "flaxlm.cli", "train", str(REPO / "configs/gpt_tiny.yaml")]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen(
        cmd + overrides, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_step(proc, run_dir: Path, step: int, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.communicate()[1][-2000:]}")
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if any(json.loads(x).get("step", 0) >= step for x in lines if x.strip()):
                return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout}s")


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(small_corpus, tiny_cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(
        small_corpus, tiny_cache_dir, run_dir, f"train.steps={STEPS}", "train.eval_every=0"
    )
    train(cfg)
    return _losses(run_dir)


def test_sigterm_saves_exits_zero_and_resumes_exactly(
    small_corpus, tiny_cache_dir, tmp_path, uninterrupted
):
    run_dir = tmp_path / "run"
    overrides = _overrides(small_corpus, tiny_cache_dir, run_dir, "checkpoint.every=1000")
    proc = _start(overrides)
    _wait_for_step(proc, run_dir, 15)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: checkpoint saved at step" in out
    saved = Checkpointer(run_dir).latest_step()
    assert 15 <= saved < STEPS  # the step it was on, not the periodic schedule (every 1000)

    resumed = _start(overrides)
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-2000:]
    assert _losses(run_dir) == uninterrupted  # bit for bit, every step


def test_sigkill_during_saves_leaves_a_restorable_run(
    small_corpus, tiny_cache_dir, tmp_path, uninterrupted
):
    run_dir = tmp_path / "run"
    # A save every step: the kill lands while one is in flight.
    overrides = _overrides(
        small_corpus, tiny_cache_dir, run_dir, "checkpoint.every=1", "checkpoint.keep=3"
    )
    proc = _start(overrides)
    _wait_for_step(proc, run_dir, 25)
    proc.kill()
    proc.communicate(timeout=60)
    assert Checkpointer(run_dir).latest_step() is not None

    resumed = _start(overrides)
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-2000:]
    assert _losses(run_dir) == uninterrupted


def test_damaged_newest_checkpoints_are_walked_past(small_corpus, tiny_cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    extra = ("train.eval_every=0", "checkpoint.every=10", "checkpoint.keep=5")
    train(tiny_config(small_corpus, tiny_cache_dir, run_dir, "train.steps=30", *extra))
    checkpoints = run_dir / "checkpoints"
    # Step 30: one bit flipped in its largest array file (Orbax alone would restore it).
    biggest = max(
        (p for p in (checkpoints / "30").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))
    # Step 20: truncated. Step 40: an empty folder, as a crash can leave.
    meta = checkpoints / "20" / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[:10])
    (checkpoints / "40").mkdir()
    (checkpoints / "50.orbax-checkpoint-tmp").mkdir()

    ckpt = Checkpointer(run_dir)
    assert ckpt.latest_step() == 30  # the empty folder and the tmp folder have no manifest
    assert "checksum" in ckpt.verify(30) and "bytes" in ckpt.verify(20)
    with pytest.warns(UserWarning) as warned:
        result = train(tiny_config(small_corpus, tiny_cache_dir, run_dir, "train.steps=40", *extra))
    messages = " ".join(str(w.message) for w in warned)
    assert "checkpoints/30 is damaged" in messages and "checkpoints/20 is damaged" in messages
    assert result.resumed_from == 10 and result.step == 40
    assert (checkpoints / "40" / MANIFEST).is_file()
