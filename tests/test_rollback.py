"""Automatic rollback on injected loss spikes and NaNs, on a real (tiny) training run."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from flaxlm.checkpoint.manager import Checkpointer
from flaxlm.train import train
from flaxlm.train.chaos import train_with_chaos
from flaxlm.train.guard_rules import TrainingDiverged

GUARDED = (
    "train.steps=60",
    "train.eval_every=0",
    "checkpoint.every=10",
    "checkpoint.keep=2",
    "guard.warmup=10",
    "guard.known_good_after=25",
)


@pytest.fixture(scope="module")
def clean_run(small_corpus, tiny_cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean")
    return train(tiny_config(small_corpus, tiny_cache_dir, run_dir, *GUARDED))


def _events(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" in r]


@pytest.mark.parametrize("fault", ["chaos.spike_at_steps=[46]", "chaos.nan_at_steps=[47]"])
def test_one_fault_one_rollback_to_the_known_good_checkpoint(
    fault, clean_run, small_corpus, tiny_cache_dir, tmp_path
):
    assert not clean_run.rollbacks  # the clean run never trips the guard
    run_dir = tmp_path / "run"
    result = train_with_chaos(tiny_config(small_corpus, tiny_cache_dir, run_dir, *GUARDED, fault))

    assert result.step == 60
    (event,) = result.rollbacks
    # The LR spike at step 46 wrecks the weights, so the loss of step 47 explodes; the NaN is
    # injected at step 47 directly. Checkpoint 20 is the newest followed by 25 healthy steps,
    # and it survived keep=2 retention because it is known good.
    assert event["step"] == 47
    assert event["restored_step"] == 20
    assert event["skipped"] == [20, 46]  # data positions of steps 21..47
    assert _events(run_dir) == [event]
    assert json.loads((run_dir / "skip_ledger.json").read_text()) == [[20, 46]]
    meta = Checkpointer(run_dir).read_meta()
    assert meta["skip_ledger"] == [[20, 46]] and meta["step"] == 60
    # After the skip the run recovers: the final validation loss is within 2 % of a clean run.
    clean, healed = clean_run.evals[-1]["val_loss"], result.evals[-1]["val_loss"]
    assert abs(healed - clean) / clean < 0.02, (clean, healed)


def test_repeated_faults_past_the_bound_stop_the_run(small_corpus, tiny_cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    # Checkpoint 10 becomes known good at step 35; each fault after that rolls back to it.
    faults = "chaos.nan_at_steps=[38,39,40]"
    cfg = tiny_config(
        small_corpus, tiny_cache_dir, run_dir, *GUARDED, faults, "guard.max_rollbacks=2"
    )
    with pytest.raises(TrainingDiverged, match="after 2 rollbacks"):
        train_with_chaos(cfg)
    events = _events(run_dir)
    assert [e["event"] for e in events] == ["rollback", "rollback", "stopped"]


# The ledger surviving kills and restarts (right after a rollback included), bit for bit
# against the uninterrupted run: tests/test_exact_resume.py and tests/test_chaos_soak.py.
