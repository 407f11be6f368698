"""One trainer per run directory: ``RUN_DIR/train.lock`` names the process that holds it.

    with RunLock(run_dir):          # a second trainer refuses, naming the holder
        ...

Two trainers on one run dir would each delete the other's newer checkpoints and interleave
their metrics. The lock is created atomically (``O_CREAT | O_EXCL``) and holds the holder's
host, pid, process start time and since when; only process 0 of a multi-host run takes it.
A lock whose holder is gone is taken over with a warning: on the same host when the pid is
dead (or now another process: its start time differs, or it is this very pid after a container
restart); from another host when the holder has not touched the lock for ``stale_after_s``
(a live holder touches it every ``heartbeat_s`` from a background thread). A holder on
another host that has missed two heartbeats is waited for rather than refused, so a job
requeued on another node after a crash starts once the old lock is stale.

On an object store (a run dir in a bucket) :class:`ObjectRunLock` keeps the same promises with
conditional writes instead of ``O_EXCL`` and renames: the lock object is created only if
absent, taken over from a stale holder only at the version judged stale, and touched by the
heartbeat only while it is still this holder's.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from flaxlm import storage
from flaxlm.runtime.pids import pid_alive

LOCK_NAME = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # 10 missed heartbeats: the holder's host is taken for dead
_UNREADABLE_GRACE_S = 5.0  # a lock this young with no content is still being written
_HELD: set[str] = set()  # locks held by this process


class RunLockError(RuntimeError):
    """The run directory is in use by another trainer; the message names it."""


class RunLock:
    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.path = self.run_dir / LOCK_NAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._inode: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock, or a stale one over; raises RunLockError naming a live holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        deadline, waited = time.monotonic() + 2 * _UNREADABLE_GRACE_S, False
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder, inode = _read(self.path)
                why = self._stale_because(holder)
                if why is None and holder is None and time.monotonic() < deadline:
                    time.sleep(0.1)  # its writer is still writing it
                    continue
                if why is None and self._silent(holder):
                    # Another host's holder that missed its heartbeats is probably dead (a
                    # requeued job after a crash): wait until its lock counts as stale.
                    if not waited:
                        print(
                            f"waiting for the lock of {self.run_dir} ({_describe(holder)}): "
                            f"untouched for {self._age():.0f}s, stale after "
                            f"{self.stale_after_s:.0f}s",
                            flush=True,
                        )
                    waited = True
                    time.sleep(min(self.heartbeat_s, 5.0))
                    continue
                if why is None:
                    raise RunLockError(self._in_use_message(holder)) from None
                warnings.warn(
                    f"taking over the lock of {self.run_dir}: {why} ({_describe(holder)})",
                    stacklevel=3,
                )
                _remove_if_same(self.path, inode)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_this_holder(), f)
                f.flush()
                os.fsync(f.fileno())
            self._inode = os.stat(self.path).st_ino
            _HELD.add(str(self.path.absolute()))
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._heartbeat, name="flaxlm-run-lock", daemon=True
            )
            self._thread.start()
            return

    def release(self) -> None:
        """Removes the lock if it is still this one's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._inode is not None:
            _remove_if_same(self.path, self._inode)
            _HELD.discard(str(self.path.absolute()))
            self._inode = None

    def _stale_because(self, holder: dict[str, Any] | None) -> str | None:
        """Why the lock's holder is gone, or None while it may be alive."""
        age = self._age()
        if holder is None:
            return f"it is unreadable and {age:.0f}s old" if age > _UNREADABLE_GRACE_S else None
        if holder.get("host") != socket.gethostname():
            if age > self.stale_after_s:
                return f"its host has not touched it for {age:.0f}s"
            return None
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            if str(self.path.absolute()) in _HELD:
                return None  # this process holds it: a second trainer in the same process
            return "it was left by an earlier process with this pid"
        if not pid_alive(pid):
            return f"process {pid} is gone"
        if holder.get("start") is not None and _start_time(pid) not in (None, holder["start"]):
            return f"pid {pid} is now another process"
        return None

    def _silent(self, holder: dict[str, Any] | None) -> bool:
        """Another host's holder that has missed two heartbeats."""
        other_host = holder is not None and holder.get("host") != socket.gethostname()
        return other_host and self._age() > 2 * self.heartbeat_s

    def _in_use_message(self, holder: dict[str, Any] | None) -> str:
        return (
            f"{self.run_dir} is in use by another trainer ({_describe(holder)}; lock "
            f"{self.path}): two trainers on one run dir overwrite each other's checkpoints; "
            "stop that one first, or use another train.run_dir"
        )

    def _age(self) -> float:
        """Seconds since the holder last touched the lock."""
        return _age(self.path)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if os.stat(self.path).st_ino != self._inode:
                    return  # taken over: nothing of ours left to touch
                os.utime(self.path)
            except OSError:
                return


def holds_run_lock(train_fn):
    """Decorator: ``train_fn(cfg, ...)`` runs holding the lock of ``cfg.train.run_dir``
    (process 0 of a multi-host run takes it; the others do not)."""

    @functools.wraps(train_fn)
    def locked(cfg, *args, **kwargs):
        import jax

        run_dir = cfg.train.run_dir
        lock = RunLock if storage.is_posix(run_dir) else ObjectRunLock
        with lock(run_dir, enabled=jax.process_index() == 0):
            return train_fn(cfg, *args, **kwargs)

    return locked


class ObjectRunLock(RunLock):
    """``RUN_DIR/train.lock`` as an object: created with If-None-Match / generation 0, taken
    over and touched with a write conditioned on the version last seen."""

    def __init__(self, run_dir: str, enabled: bool = True, **kwargs: float):
        super().__init__(run_dir, enabled, **kwargs)
        self.run_dir = run_dir  # a URL: no Path (it would fold the //)
        self.path = storage.join(run_dir, LOCK_NAME)
        self._version: str | None = None
        self._seen_age = 0.0

    def acquire(self) -> None:
        deadline, waited = time.monotonic() + 2 * _UNREADABLE_GRACE_S, False
        holder_bytes = json.dumps(_this_holder()).encode()
        while True:
            self._version = storage.create(self.path, holder_bytes)
            if self._version is not None:
                break
            found = storage.info(self.path)
            if found is None:
                continue  # released meanwhile
            self._seen_age = max(time.time() - found.mtime, 0.0)
            holder = _parse(self.path)
            why = self._stale_because(holder)
            if why is None and holder is None and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            if why is None and self._silent(holder):
                if not waited:
                    print(f"waiting for the lock of {self.run_dir} ({_describe(holder)})")
                waited = True
                time.sleep(min(self.heartbeat_s, 5.0))
                continue
            if why is None:
                raise RunLockError(self._in_use_message(holder))
            warnings.warn(
                f"taking over the lock of {self.run_dir}: {why} ({_describe(holder)})",
                stacklevel=3,
            )
            self._version = storage.replace(self.path, holder_bytes, found.version)
            if self._version is not None:
                break
        _HELD.add(self.path)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="flaxlm-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._version is not None:
            found = storage.info(self.path)
            if found is not None and found.version == self._version:
                storage.delete(self.path)
            _HELD.discard(self.path)
            self._version = None

    def _heartbeat(self) -> None:
        holder, beat = _this_holder(), 0
        while not self._stop.wait(self.heartbeat_s):
            # A beat count in the body: S3's version (ETag) is the body's hash, so rewriting
            # the same bytes would leave it unchanged and a beat could not be told apart.
            beat += 1
            holder_bytes = json.dumps({**holder, "beat": beat}).encode()
            try:
                self._version = storage.replace(self.path, holder_bytes, self._version)
            except OSError:
                continue  # a store that did not answer: try at the next beat
            if self._version is None:
                return  # taken over: nothing of ours left to touch

    def _stale_because(self, holder: dict[str, Any] | None) -> str | None:
        same = holder is not None and holder.get("host") == socket.gethostname()
        if same and int(holder.get("pid", -1)) == os.getpid():
            return None if self.path in _HELD else "it was left by an earlier process with this pid"
        return super()._stale_because(holder)

    def _age(self) -> float:
        return self._seen_age


def _parse(url: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(storage.read_bytes(url))
    except (FileNotFoundError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _this_holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _start_time(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "holder unknown: the lock is empty or unreadable"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


def _read(path: Path) -> tuple[dict[str, Any] | None, int | None]:
    """The holder written in the lock (None if unreadable) and the lock's inode."""
    inode = None
    try:
        inode = os.stat(path).st_ino
        holder = json.loads(path.read_text())
        return (holder if isinstance(holder, dict) else None), inode
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return None, inode


def _remove_if_same(path: Path, inode: int | None) -> None:
    """Removes the lock only if it is still the file judged (``inode``): a racing trainer may
    have replaced it meanwhile. The rename makes the judged file ours before it is checked."""
    if inode is None:
        return
    aside = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.old")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if os.stat(aside).st_ino == inode:
        os.unlink(aside)
        return
    try:  # another trainer's fresh lock: put it back
        os.link(aside, path)
    except FileExistsError:
        pass
    os.unlink(aside)


def _age(path: Path) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None: tells a pid's
    holder from a later process that reused the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])
