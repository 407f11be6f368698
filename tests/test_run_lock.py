"""One trainer per run dir: a second one refuses naming the holder; a dead holder's lock is
taken over with a warning."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO

from flaxlm.cli import main
from flaxlm.train.run_lock import LOCK_NAME, RunLock, RunLockError

RUN_LOCK_PY = REPO / "flaxlm" / "train" / "run_lock.py"


def _finished_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _fake_lock(run_dir, host=None, pid=None, start=None, age_s=0.0):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    holder = {"host": host or socket.gethostname(), "pid": pid, "start": start}
    path.write_text(json.dumps({**holder, "since": "2025-01-01 00:00:00 UTC"}))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_second_trainer_process_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    # The holder loads run_lock.py alone (it needs only the standard library): no jax import.
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import importlib.util, time\n"
            f"spec = importlib.util.spec_from_file_location('run_lock', {str(RUN_LOCK_PY)!r})\n"
            "run_lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(run_lock)\n"
            f"with run_lock.RunLock({str(run_dir)!r}):\n"
            "    print('held', flush=True); time.sleep(60)"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockError) as info:
            RunLock(run_dir).acquire()
        message = str(info.value)
        assert f"{run_dir} is in use by another trainer" in message
        assert f"host {socket.gethostname()}, pid {holder.pid}, since 20" in message
        assert "\n" not in message
    finally:
        holder.kill()
        holder.wait()
    # Killed without releasing: the next trainer takes the lock over.
    with pytest.warns(UserWarning, match=f"process {holder.pid} is gone"):
        with RunLock(run_dir):
            assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (run_dir / LOCK_NAME).exists()


def test_a_dead_holder_is_taken_over_with_a_warning(tmp_path):
    dead = _finished_pid()
    _fake_lock(tmp_path, pid=dead)
    with pytest.warns(UserWarning, match=rf"taking over the lock of .*process {dead} is gone"):
        lock = RunLock(tmp_path).__enter__()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.__exit__(None, None, None)
    assert list(tmp_path.iterdir()) == []


def test_this_pid_left_by_an_earlier_process_is_stale_but_a_lock_held_here_is_not(tmp_path):
    _fake_lock(tmp_path, pid=os.getpid())  # a restarted container gets the same pid again
    with pytest.warns(UserWarning, match="left by an earlier process with this pid"):
        with RunLock(tmp_path):
            with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
                RunLock(tmp_path).acquire()  # a second trainer in this very process


def test_a_reused_pid_is_stale(tmp_path):
    _fake_lock(tmp_path, pid=os.getppid(), start=1)
    with pytest.warns(UserWarning, match="is now another process"):
        with RunLock(tmp_path):
            pass


def test_another_hosts_lock_counts_while_it_heartbeats(tmp_path):
    _fake_lock(tmp_path, host="node-7", pid=123, age_s=10)
    with pytest.raises(RunLockError, match="host node-7, pid 123, since 2025-01-01"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    _fake_lock(tmp_path, host="node-7", pid=123, age_s=120)
    with pytest.warns(UserWarning, match="its host has not touched it for 120s"):
        with RunLock(tmp_path, stale_after_s=60):
            pass


def test_another_hosts_silent_holder_is_waited_for_then_taken_over(tmp_path):
    _fake_lock(tmp_path, host="node-7", pid=123, age_s=0.5)  # missed 2 heartbeats of 0.1 s
    start = time.monotonic()
    with pytest.warns(UserWarning, match="its host has not touched it"):
        with RunLock(tmp_path, heartbeat_s=0.1, stale_after_s=1.5):
            pass
    assert 0.9 < time.monotonic() - start < 5


def test_the_holder_heartbeats_and_other_processes_take_no_lock(tmp_path):
    with RunLock(tmp_path / "a", heartbeat_s=0.05) as lock:
        os.utime(lock.path, (0, 0))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 5
    with RunLock(tmp_path / "b", enabled=False):
        assert not (tmp_path / "b" / LOCK_NAME).exists()


def test_flaxlm_train_on_a_locked_run_dir_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    argv = [
        "train", str(REPO / "configs" / "gpt_tiny.yaml"), f"data.paths=[{tmp_path}]",
        f"data.cache_dir={tmp_path / 'cache'}", f"train.run_dir={run_dir}",
    ]  # fmt: skip
    err = io.StringIO()
    with RunLock(run_dir), contextlib.redirect_stderr(err):
        assert main(argv) == 2
    assert err.getvalue().startswith(
        f"flaxlm train: error: {run_dir} is in use by another trainer "
        f"(host {socket.gethostname()}, pid {os.getpid()}, since "
    )
    assert err.getvalue().count("\n") == 1
    assert not (run_dir / "checkpoints").exists()
