"""SIGTERM to one process of a real 2-process run (2 CPU devices each, over 127.0.0.1): every
process stops after the same step, saves it together and exits 0, and the checkpoint restores."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, tiny_config, unoptimized_env

from flaxlm.checkpoint.manager import Checkpointer
from flaxlm.train import train

STEPS = 400  # far more than it gets to: the signal comes first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_step(procs, run_dir: Path, step: int, timeout: float = 180) -> None:
    metrics = run_dir / "metrics.jsonl"  # written by process 0
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            outs = [p.communicate()[1][-2000:] for p in procs]
            raise AssertionError(f"a worker exited early: {outs}")
        if metrics.exists():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if any(r.get("step", 0) >= step for r in lines):
                return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.mark.slow
@pytest.mark.usefixtures("unoptimized_compiles")
def test_sigterm_to_one_process_stops_all_at_one_step_with_a_restorable_checkpoint(
    small_corpus, tiny_cache_dir, tmp_path
):
    run_dir, port = tmp_path / "run", _free_port()
    # Compiling is most of a worker's time to step 10: it compiles unoptimized (conftest.py).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | unoptimized_env()
    cmd = [sys.executable, str(REPO / "tests" / "preempt_worker.py"), str(small_corpus),
           str(tiny_cache_dir), str(run_dir), str(STEPS)]  # fmt: skip
    procs = [
        subprocess.Popen(
            cmd,
            env=env
            | {
                "FLAXLM_COORDINATOR": f"127.0.0.1:{port}",
                "FLAXLM_NUM_PROCESSES": "2",
                "FLAXLM_PROCESS_ID": str(i),
                "FLAXLM_LOCAL_DEVICES": "2",
            },  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        _wait_for_step(procs, run_dir, 10)
        os.kill(procs[1].pid, signal.SIGTERM)  # process 1 only; process 0 hears nothing
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out.splitlines()[-1]) for out, _ in outs]
    assert [r["process"] for r in reports] == [0, 1]
    assert reports[0]["step"] == reports[1]["step"]
    step = reports[0]["step"]
    assert 10 <= step < STEPS
    assert [r["preempted"] for r in reports] == ["SIGTERM to process 1"] * 2
    assert f"SIGTERM to process 1: checkpoint saved at step {step}" in outs[0][0]

    # The checkpoint of that step is complete, matches its manifest and restores into this
    # single process, which trains on from it.
    ckpt = Checkpointer(run_dir)
    assert ckpt.latest_step() == step and ckpt.verify(step) is None
    more = tiny_config(
        small_corpus, tiny_cache_dir, run_dir, f"train.steps={step + 1}", "train.eval_every=0",
        "checkpoint.every=1000",
    )  # fmt: skip
    result = train(more)
    assert result.resumed_from == step and result.step == step + 1
