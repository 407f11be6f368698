"""Two processes (2 CPU devices each, joined through jax.distributed on 127.0.0.1) train with
the run dir in a bucket (moto's S3 server) and no shared disk: each process writes its part
of every checkpoint to its own local folder and copies it up; process 0 seals the step once
both parts are up. The job is killed; one host's local disk is wiped; the hosts agree to
resume from the bucket, and the resumed run retrains the lost steps to the losses they had
before the kill. A single process then restores the two-host checkpoint from the bucket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import object_stores
import pytest
from conftest import unoptimized_env

from flaxlm import storage
from flaxlm.checkpoint.tiers import PersistentTier
from flaxlm.tools.load import load_checkpoint
from flaxlm.train.metrics_log import read_metrics

s3_server = object_stores.s3_server

pytestmark = pytest.mark.slow  # two two-process runs

WORKER = Path(__file__).parent / "object_store_worker.py"
RUN = (
    "train.steps=8",
    "train.eval_every=0",
    "checkpoint.every=4",
    "checkpoint.local_every=2",
)


def _job(args: list[str], env: dict[str, str]) -> list[tuple[int, str]]:
    """Runs the two worker processes to their end: (exit code, output) of each."""
    port = str(object_stores.free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            env=env | {"FLAXLM_COORDINATOR": f"127.0.0.1:{port}", "FLAXLM_NUM_PROCESSES": "2",
                       "FLAXLM_PROCESS_ID": str(i), "FLAXLM_LOCAL_DEVICES": "2"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
        return [(p.returncode, out) for p, out in zip(procs, outs, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _losses(records) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def test_two_hosts_resume_from_a_bucket_after_a_kill_and_a_wiped_disk(
    s3_server, small_corpus, tiny_cache_dir, tmp_path, monkeypatch
):
    run_dir, nvme = object_stores.make_bucket("s3") + "/run", tmp_path / "nvme"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"FLAXLM_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    env |= unoptimized_env()  # short runs: compiling is their cost; both compile alike
    args = [str(small_corpus), str(tiny_cache_dir), run_dir, str(nvme)]
    killed = _job([*args, "7", *RUN], env)  # saves 2, 4 (both tiers), 6; killed after 7
    assert [code for code, _ in killed] == [9, 9], killed[0][1][-3000:] + killed[1][1][-3000:]
    tier = PersistentTier(storage.join(run_dir, "checkpoints"))
    assert tier.steps() == [4]
    shutil.rmtree(nvme / "process-1")  # host 1's disk is wiped: step 6 is not on every host
    before = _losses(read_metrics(storage.join(run_dir, "metrics.jsonl")))
    assert len(before) == 6  # flushed with the save of step 6 (local only, lost with host 1)
    resumed = _job([*args, "0", *RUN], env)
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:] + resumed[1][1][-3000:]
    out = resumed[0][1]
    assert (
        f"checkpoint.local_dir {nvme} does not hold an intact checkpoint of step 4 or later on "
        f"every host: resuming from {run_dir}/checkpoints"
    ) in out
    ends = [json.loads(o.splitlines()[-1]) for _, o in resumed]
    assert [e["resumed_from"] for e in ends] == [4, 4]
    # Steps 5 and 6 again, from the bucket's step 4: the losses of the run before the kill.
    after = _losses(read_metrics(storage.join(run_dir, "metrics.jsonl")))
    assert len(after) == 8
    np.testing.assert_allclose(after[:6], before, rtol=0, atol=1e-6)
    # The two hosts' parts make one checkpoint: a single process restores it from the bucket
    # (a shard missing from the union would read as zeros).
    monkeypatch.setenv("FLAXLM_CACHE", str(tmp_path / "eval-host"))
    loaded = load_checkpoint(run_dir)
    assert loaded.step == 8
    sums = [float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(loaded.params)]
    np.testing.assert_allclose(sums, ends[0]["sums"], rtol=1e-6)
