"""Signals and crashes, with real subprocesses: SIGTERM saves and exits 0, SIGKILL mid-save
leaves a restorable run, and damaged checkpoints are walked past, never restored. The guard's
agreement between processes is checked here on an in-memory key-value store, and with real
processes in test_multihost_preemption.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import REPO, tiny_config

from flaxlm.checkpoint.manager import MANIFEST, Checkpointer
from flaxlm.train import train
from flaxlm.train.preemption import STOP_MARGIN, PreemptionGuard
from flaxlm.train.watchdog import EXIT_CODE

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


def test_sigterm_saves_exits_75_and_resumes_exactly(
    small_corpus, tiny_cache_dir, tmp_path, uninterrupted
):
    run_dir = tmp_path / "run"
    overrides = _overrides(small_corpus, tiny_cache_dir, run_dir, "checkpoint.every=1000")
    proc = _start(overrides)
    _wait_for_step(proc, run_dir, 15)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CODE, err[-2000:]  # "run me again", for a scheduler
    assert "SIGTERM: checkpoint saved at step" in out
    saved = Checkpointer(run_dir).latest_step()
    assert 15 <= saved < STEPS  # the step it was on, not the periodic schedule (every 1000)

    resumed = _start(overrides)
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-2000:]
    assert _losses(run_dir) == uninterrupted  # bit for bit, every step


# SIGKILL during saves (checkpoint every step or two, kills at random steps) is covered, bit
# for bit against the undisturbed run, by tests/test_chaos_soak.py.


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


class FakeStore:
    """jax.distributed's key-value client, in memory, with the same errors by name."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.changed = threading.Condition()

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        with self.changed:
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
            self.data[key] = value
            self.changed.notify_all()

    def key_value_try_get(self, key: str) -> str:
        with self.changed:
            if key not in self.data:
                raise RuntimeError(f"NOT_FOUND: Config key {key} not found.")
            return self.data[key]

    def blocking_key_value_get(self, key: str, timeout_in_ms: int) -> str:
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.data, timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            return self.data[key]

    def key_value_increment(self, key: str, increment: int) -> int:
        with self.changed:
            self.data[key] = str(int(self.data.get(key, "0")) + increment)
            return int(self.data[key])


def _first_stop(guard: PreemptionGuard, calls: int) -> int | None:
    """Calls ``stop_at`` ``calls`` times (one per loop iteration); the first call that said
    stop, and checks that every later one says so too."""
    answers = [guard.stop_at(step) for step in range(calls)]
    first = answers.index(True) + 1 if True in answers else None
    assert first is None or all(answers[first - 1 :])
    return first


def test_one_process_stops_at_the_next_iteration_after_a_signal():
    with PreemptionGuard(process_index=0, process_count=1) as guard:
        assert not guard.stop_at(0) and guard.signal_name is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.stop_at(1) and guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # pytest's, given back


@pytest.mark.parametrize("signalled", [[1], [0, 1]])
def test_processes_agree_on_one_iteration_whoever_gets_the_signal(signalled):
    store = FakeStore()
    with ExitStack() as stack:
        guards = [
            stack.enter_context(PreemptionGuard(store, index, 2, ack_timeout_s=5))
            for index in range(2)
        ]
        # Process 0 is 2 iterations ahead, as far as the step's collectives let it get.
        assert _first_stop(guards[0], 7) is None and _first_stop(guards[1], 5) is None
        for index in signalled:
            guards[index].received = "SIGTERM"  # what the handler records
        # Process 1 proposes at its 6th iteration: everyone stops at 6 + STOP_MARGIN, and
        # process 0 learned it (through its watcher) before getting there.
        assert guards[1].stop_at(5) is False
        assert guards[0]._stop_call == 6 + STOP_MARGIN
        assert _first_stop(guards[0], 10) == 6 + STOP_MARGIN - 7
        assert _first_stop(guards[1], 10) == STOP_MARGIN
        for guard in guards:
            assert guard.signal_name == "SIGTERM to process 1"
    assert not any(t.name == "flaxlm-preemption" for t in threading.enumerate())


def test_no_signal_means_no_stop_and_the_watchers_end_with_the_guard():
    store = FakeStore()
    with ExitStack() as stack:
        guards = [stack.enter_context(PreemptionGuard(store, i, 2)) for i in range(2)]
        assert [_first_stop(g, 20) for g in guards] == [None, None]
    assert not any(t.name == "flaxlm-preemption" for t in threading.enumerate())
    assert not any(key.endswith("/stop") for key in store.data)


def test_a_silent_peer_delays_the_stop_by_the_ack_timeout_only(capsys):
    store = FakeStore()
    # Process 1 never entered its guard (it died): no watcher will confirm.
    with PreemptionGuard(store, 0, 2, ack_timeout_s=0.2) as guard:
        guard.received = "SIGTERM"
        assert _first_stop(guard, 5) == 1 + STOP_MARGIN
    assert "not every process confirmed the stop within" in capsys.readouterr().err
