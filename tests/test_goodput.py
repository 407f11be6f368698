"""Goodput: every second since a run began lands in one part (productive steps, compilation,
data waits, evaluation, checkpoint saves and restores, steps discarded by a rollback, steps a
restart trains again, the time between a kill and the restart), across kill -9 and restarts,
and the parts add up to the wall-clock time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, tiny_config

from flaxlm.cli import main
from flaxlm.train import goodput as goodput_module
from flaxlm.train.chaos import train_with_chaos
from flaxlm.train.goodput import PARTS, GoodputClock, read_goodput


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_each_second_goes_to_one_part_across_a_rollback_a_kill_and_a_restart(tmp_path, monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr(goodput_module, "time", clock)
    first = GoodputClock.open(tmp_path)
    clock.sleep(3)  # data, model
    first.enter("restore", 0)
    first.resumed(0)
    for step in range(1, 13):  # step 1 compiles (5 s); then 1 s a step
        first.enter("step", step)
        clock.sleep(5 if step == 1 else 1)
        if step == 10:
            first.enter("checkpoint", 10)
            clock.sleep(2)
            first.saved(10)
    first.enter("rollback", 12)  # step 12 was bad: back to 10, steps 11 and 12 discarded
    clock.sleep(0.5)
    first.rolled_back(10)
    first.enter("step", 11)
    clock.sleep(1)
    first.enter("step", 12)  # the line of this phase change is the last one: kill -9 now
    clock.sleep(7)  # the rest of step 12, the kill, the scheduler

    again = GoodputClock.open(tmp_path)
    clock.sleep(2)
    again.enter("restore", 0)
    clock.sleep(1)
    again.resumed(10)  # step 11 (trained after the rollback) is lost with the kill
    again.enter("step", 11)
    clock.sleep(4)  # compiles again
    again.close()

    last = read_goodput(tmp_path)[-1]
    assert last["wall"] == pytest.approx(clock.now - 1000.0)
    assert sum(last["parts"].values()) == pytest.approx(last["wall"])
    expected = {
        "startup": 3 + 2, "checkpoint_restore": 0.5 + 1, "compile": 5 + 4,
        "productive": 9, "checkpoint_save": 2, "rollback_discarded": 2,
        "restart_replayed": 1, "lost": 7, "data": 0, "eval": 0, "other": 0,
    }  # fmt: skip
    assert last["parts"] == pytest.approx(expected)
    assert set(last["parts"]) == set(PARTS)
    assert last["goodput"] == pytest.approx(9 / last["wall"])


def test_the_device_waiting_for_data_is_data_time(tmp_path, monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr(goodput_module, "time", clock)
    c = GoodputClock.open(tmp_path)
    c.enter("step", 1)
    c.enter("step", 2)
    clock.sleep(3)
    c.data_wait(1.0)
    c.close()
    assert read_goodput(tmp_path)[-1]["parts"]["productive"] == pytest.approx(2.0)
    assert read_goodput(tmp_path)[-1]["parts"]["data"] == pytest.approx(1.0)


RUN = (
    "train.steps=20",
    "train.eval_every=10",
    "checkpoint.every=5",
    "guard.warmup=5",
    "guard.known_good_after=5",
)
HANG = "chaos.hang_at_steps=[12]"  # the first attempt stalls before step 12: kill -9 it there
SPIKE = "chaos.spike_at_steps=[13]"  # the restart's step 14 explodes: a rollback


def _chaos(corpus, cache, run_dir, *faults):
    """The chaos harness in a subprocess, for kill -9."""
    cmd = [sys.executable, "-m", "flaxlm.train.chaos", str(REPO / "configs/gpt_tiny.yaml")]
    cmd += [f"data.paths=[{corpus}]", f"data.cache_dir={cache}", "data.val_fraction=0.34"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen(
        [*cmd, f"train.run_dir={run_dir}", *RUN, *faults], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(proc, path, step, timeout=180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        lines = path.read_text().splitlines() if path.exists() else []
        if any(json.loads(x).get("step", 0) >= step for x in lines[:-1]):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {path} within {timeout} s")


@pytest.mark.slow  # a trainer subprocess and a restart: 77-125 s on the busy 2-core slot
def test_a_kill_a_rollback_and_a_restart_add_up_to_the_wall_clock(
    small_corpus, tiny_cache_dir, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    began = time.time()
    proc = _chaos(small_corpus, tiny_cache_dir, run_dir, HANG)
    _wait_for(proc, run_dir / "goodput.jsonl", 11)  # then step 12 stalls
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # the scheduler's delay
    # The restart, in this process (one interpreter start less): the run lock of the killed
    # trainer is stale, the newest checkpoint is 10, and step 14 rolls the run back.
    result = train_with_chaos(tiny_config(small_corpus, tiny_cache_dir, run_dir, *RUN, SPIKE))
    ended = time.time()
    assert result.step == 20 and result.resumed_from == 10 and len(result.rollbacks) == 1

    last = read_goodput(run_dir)[-1]
    parts = last["parts"]
    assert sum(parts.values()) == pytest.approx(last["wall"], rel=1e-9)
    run_began = last["t"] - last["wall"]
    assert began <= run_began and last["t"] <= ended  # the wall-clock of the run itself
    assert parts["lost"] >= 1.5  # the stall and the sleep, at least
    for part in PARTS[:-1]:  # each but "other" (host work between phases: may round to 0)
        if part != "data":  # the host keeps ahead of a tiny model's steps
            assert parts[part] > 0, part
    assert 0 < last["goodput"] <= 1
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all(0 < r["goodput"] <= 1 for r in steps)
    assert [r["event"] for r in records if "event" in r] == ["rollback"]

    assert main(["report", str(run_dir)]) == 0
    report = capsys.readouterr().out
    assert "## Goodput: " in report and "| rollback_discarded: " in report
    assert (run_dir / "report" / "goodput.png").is_file()
