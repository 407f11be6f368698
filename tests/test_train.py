"""End-to-end training on a tiny GPT: learning, outputs, checkpoints and exact resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from conftest import tiny_config

from flaxlm.train import train


def test_short_run_learns_and_writes_its_outputs(small_corpus, tiny_cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        small_corpus, tiny_cache_dir, run_dir, "train.steps=60", "train.eval_every=30"
    )
    result = train(cfg)
    assert result.step == 60
    # Validation loss falls far below the untrained model's loss (~ln 384 = 5.95) and keeps
    # falling between the two evaluations.
    untrained = result.history[0]["loss"]
    mid, last = result.evals[0]["val_loss"], result.evals[-1]["val_loss"]
    assert untrained > 5.5
    assert last < untrained - 1.2, (untrained, last)
    assert last < mid, (mid, last)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 61))
    for key in ("step", "loss", "lr", "grad_norm"):
        assert all(key in r for r in train_lines), key
    # The first step's time holds the compilation: rates start with the steps after it.
    assert "tokens_per_s" not in train_lines[0]
    assert all(r["tokens_per_s"] > 0 for r in train_lines[1:])
    assert [r["step"] for r in records if "val_loss" in r] == [30, 60]
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").iterdir())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["steps"] == 60
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [40, 50, 60]  # every 10, keep the last 3
    assert (run_dir / "tokenizer.model").stat().st_size > 0


RESUMABLE = ("train.steps=16", "checkpoint.every=4", "model.dropout=0.1", "train.eval_every=0")


@pytest.fixture(scope="module")
def straight(small_corpus, tiny_cache_dir, tmp_path_factory):
    """The uninterrupted run the resumed ones must equal (dropout on: its RNG must resume)."""
    run_dir = tmp_path_factory.mktemp("straight")
    return train(tiny_config(small_corpus, tiny_cache_dir, run_dir, *RESUMABLE))


def test_interrupted_run_resumes_bit_for_bit(straight, small_corpus, tiny_cache_dir, tmp_path):
    # Preempted at step 6 (a checkpoint is written on the way out) ...
    resumed_dir = tmp_path / "b"
    first = train(
        tiny_config(small_corpus, tiny_cache_dir, resumed_dir, *RESUMABLE), stop_at_step=6
    )
    assert first.step == 6
    # ... and started again on the same run dir.
    second = train(tiny_config(small_corpus, tiny_cache_dir, resumed_dir, *RESUMABLE))
    assert second.resumed_from == 6
    losses_straight = np.array([r["loss"] for r in straight.history])
    losses_resumed = np.array([r["loss"] for r in first.history + second.history])
    np.testing.assert_array_equal(losses_straight, losses_resumed)
    # metrics.jsonl holds one line per step, no duplicates from the interrupted attempt.
    lines = [json.loads(x) for x in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 17))


def test_resume_from_an_older_checkpoint_replays_the_same_steps(
    straight, small_corpus, tiny_cache_dir, tmp_path
):
    """A crash between checkpoints loses the steps since the last one; they replay exactly."""
    crashed = tmp_path / "b"
    train(tiny_config(small_corpus, tiny_cache_dir, crashed, *RESUMABLE), stop_at_step=10)
    # Simulate losing the step-10 checkpoint in the crash: the newest is then step 8.
    shutil.rmtree(crashed / "checkpoints" / "10")
    again = train(tiny_config(small_corpus, tiny_cache_dir, crashed, *RESUMABLE))
    assert again.resumed_from == 8
    np.testing.assert_array_equal(
        [r["loss"] for r in straight.history[8:]], [r["loss"] for r in again.history]
    )
