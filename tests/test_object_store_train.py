"""Training with the run dir in a bucket (an S3 server and a GCS emulator on 127.0.0.1): the
run trains, is killed during a save, resumes, rolls back a loss spike, and ends bit for bit
where the same run in a local folder ends; its metrics read back as one file; it evaluates
from the bucket; and a second trainer on the same run is refused by the lock object."""

from __future__ import annotations

import json

import numpy as np
import object_stores
import pytest
from conftest import tiny_config

from flaxlm import storage
from flaxlm.checkpoint.tiers import PersistentTier
from flaxlm.tools.load import load_checkpoint
from flaxlm.train.chaos import train_with_chaos
from flaxlm.train.metrics_log import read_metrics
from flaxlm.train.run_lock import ObjectRunLock, RunLockError

# the servers' fixtures (tests/object_stores.py)
bucket, s3_server, gcs_server = (
    object_stores.bucket,
    object_stores.s3_server,
    object_stores.gcs_server,
)

pytestmark = pytest.mark.slow  # a local run plus a killed and a resumed one per store

RUN = (
    "train.steps=24",
    "train.eval_every=0",
    "checkpoint.every=4",
    "checkpoint.asynchronous=false",  # the kill below is raised in this process
    "guard.warmup=4",
    "guard.known_good_after=4",
    "chaos.spike_at_steps=[14]",  # step 15's loss explodes: back to a checkpoint before it
)
TIMING = ("tokens_per_s", "mfu", "goodput", "step_s", "data_s")


class Killed(BaseException):
    """Stands in for kill -9: nothing in flaxlm catches it."""


def _metrics(records):
    return [{k: v for k, v in r.items() if k not in TIMING and "_s" not in k} for r in records]


@pytest.fixture(scope="module")
def local_run(small_corpus, tiny_cache_dir, tmp_path_factory):
    """The same run in a local folder, never interrupted: what the bucket runs must match."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    result = train_with_chaos(tiny_config(small_corpus, tiny_cache_dir, run_dir, *RUN))
    return run_dir, result


def test_a_run_in_a_bucket_survives_a_kill_mid_upload(
    bucket, local_run, small_corpus, tiny_cache_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("FLAXLM_CACHE", str(tmp_path / "cache"))
    run_dir = f"{bucket}/runs/gpt"
    cfg = tiny_config(small_corpus, tiny_cache_dir, run_dir, *RUN)
    original, fired = PersistentTier.upload, []

    def upload_then_die(self, folder, step):
        if step == 12 and not fired:  # the files are up, the manifest is not: a kill -9
            fired.append(step)
            storage.upload_tree(folder, storage.join(self.url, str(step)), skip=("MANIFEST.json",))
            raise Killed(f"upload of {step}")
        return original(self, folder, step)

    monkeypatch.setattr(PersistentTier, "upload", upload_then_die)
    with pytest.raises(Killed):
        train_with_chaos(cfg)
    assert PersistentTier(f"{run_dir}/checkpoints").unsealed() == [12]  # not counted
    monkeypatch.setenv("FLAXLM_CACHE", str(tmp_path / "another-host"))  # nothing local
    result = train_with_chaos(cfg)
    local_dir, straight = local_run
    assert result.resumed_from == 8 and result.step == 24
    assert [(e["step"], e["restored_step"]) for e in result.rollbacks] == [
        (e["step"], e["restored_step"]) for e in straight.rollbacks
    ]
    assert straight.rollbacks  # the spike did roll back
    # metrics.jsonl, merged from its segments, is the uninterrupted run's line for line
    here = _metrics(read_metrics(storage.join(run_dir, "metrics.jsonl")))
    there = _metrics(read_metrics(local_dir / "metrics.jsonl"))
    assert here == there
    assert 12 not in PersistentTier(f"{run_dir}/checkpoints").unsealed()
    # the weights, restored from the bucket on a third host, are the local run's bit for bit
    monkeypatch.setenv("FLAXLM_CACHE", str(tmp_path / "eval-host"))
    a, b = load_checkpoint(run_dir), load_checkpoint(local_dir)
    assert a.step == b.step == 24
    for x, y in zip(
        np.asarray(a.params["blocks_0"]["attn"]["query"]["kernel"]),
        np.asarray(b.params["blocks_0"]["attn"]["query"]["kernel"]),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    ledger = json.loads(storage.read_text(storage.join(run_dir, "skip_ledger.json")))
    assert ledger == json.loads((local_dir / "skip_ledger.json").read_text())
    # the run's lock object is gone; a second trainer meets a live one and is refused
    assert storage.info(storage.join(run_dir, "train.lock")) is None
    with ObjectRunLock(run_dir):
        with pytest.raises(RunLockError, match="in use by another trainer"):
            ObjectRunLock(run_dir).acquire()
