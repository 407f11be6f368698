"""The run lock as an object (an S3 server and a GCS emulator on 127.0.0.1): a live holder on
another host is refused, naming it; a holder that stopped touching the lock is waited for and
then taken over at the version judged stale; the heartbeat keeps a held lock fresh."""

from __future__ import annotations

import json
import socket
import time

import object_stores
import pytest

from flaxlm import storage
from flaxlm.train.run_lock import ObjectRunLock, RunLockError

# the servers' fixtures (tests/object_stores.py)
bucket, s3_server, gcs_server = (
    object_stores.bucket,
    object_stores.s3_server,
    object_stores.gcs_server,
)


def _plant(url: str, host: str = "node-7") -> None:
    holder = {"host": host, "pid": 4242, "since": "earlier"}
    assert storage.create(storage.join(url, "train.lock"), json.dumps(holder).encode())


def test_a_live_holder_on_another_host_is_refused(bucket):
    run = f"{bucket}/run"
    _plant(run)
    with pytest.raises(RunLockError) as err:
        ObjectRunLock(run, heartbeat_s=30, stale_after_s=300).acquire()
    assert "in use by another trainer (host node-7, pid 4242, since earlier" in str(err.value)


def test_a_silent_holder_is_taken_over_once_stale(bucket, capsys):
    run = f"{bucket}/run"
    _plant(run)
    lock = ObjectRunLock(run, heartbeat_s=0.5, stale_after_s=2.5)
    time.sleep(1.1)  # two missed heartbeats: waited for, not refused
    with pytest.warns(UserWarning, match="taking over the lock .* has not touched it"):
        lock.acquire()
    assert "waiting for the lock of" in capsys.readouterr().out
    holder = json.loads(storage.read_text(f"{run}/train.lock"))
    assert holder["host"] == socket.gethostname()
    before = storage.info(f"{run}/train.lock").version
    deadline = time.monotonic() + 10
    while storage.info(f"{run}/train.lock").version == before and time.monotonic() < deadline:
        time.sleep(0.1)  # the heartbeat rewrites it at the version it wrote
    assert storage.info(f"{run}/train.lock").version != before
    lock.release()
    assert storage.info(f"{run}/train.lock") is None
