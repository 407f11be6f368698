"""The files of a checkpoint: are they whole, and is an error damage, a flaky disk or a full one?

``MANIFEST.json`` lists every file of a checkpoint folder with its size and SHA-256; it is
written last, so a folder with a manifest that matches its files is complete and unchanged
(:func:`write_manifest`, :func:`manifest_problem`). Reads that fail with an OSError are
retried (:func:`retrying`): an I/O error is not damage, and must never make a restore walk
past an intact checkpoint. :func:`is_io_error` and :func:`is_disk_full` sort the errors of a
failed save, which Orbax and tensorstore raise in many forms.

:class:`flaxlm.checkpoint.manager.Checkpointer` uses these; ``CheckpointError`` is defined here so
the
retries can raise it, and is imported from :mod:`flaxlm.checkpoint.manager`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

MANIFEST = "MANIFEST.json"
IO_ATTEMPTS = 3  # reads that fail with an OSError are tried this often in all
IO_BACKOFF_S = 0.5  # before the first retry; doubles each time

T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, does not fit, or cannot be read or written; the
    one-line message names it."""


# -- the manifest ----------------------------------------------------------------------------


def write_manifest(folder: Path, step: int, host: dict | None = None) -> None:
    """Writes ``folder/MANIFEST.json``: the size and SHA-256 of every other file in it, and
    ``host``, the part of a checkpoint written by several hosts that ``folder`` holds
    (:func:`flaxlm.checkpoint.hosts.host_part`). Written through a temporary file and
    renamed, so a manifest is never half there."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[str(path.relative_to(folder))] = [path.stat().st_size, _sha256(path)]
    tmp = folder / (MANIFEST + ".tmp")
    manifest = {"step": step, "files": files, **({"host": host} if host else {})}
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, folder / MANIFEST)


def manifest_problem(folder: Path) -> str | None:
    """None if every file in ``folder``'s manifest is there with its size and checksum, else
    what is wrong (no manifest, one that does not parse, the first file that differs). An
    I/O error while reading raises OSError: that is not damage."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"it has no {MANIFEST} (its save never finished)"
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return f"{MANIFEST} is not valid JSON"
    for rel, (size, digest) in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, expected {size}"
        if _sha256(path) != digest:
            return f"{rel} does not match its checksum"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- I/O errors ------------------------------------------------------------------------------


def retrying(what: str, read: Callable[[], T]) -> T:
    """``read()``, tried IO_ATTEMPTS times while it raises OSError (a flaky disk or network
    file system), then a one-line CheckpointError: an I/O error is not damage. A missing
    file is no I/O error: it is raised at once."""
    for attempt in range(IO_ATTEMPTS):
        try:
            return read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if attempt + 1 == IO_ATTEMPTS:
                raise CheckpointError(
                    f"I/O error {what} ({one_line(exc)}), {IO_ATTEMPTS} tries; nothing was deleted"
                ) from exc
            time.sleep(IO_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for error messages that must stay one line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# Tensorstore reports OS errors as ValueError text ("... [os_error_code='28']").
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def is_io_error(exc: BaseException) -> bool:
    """Whether ``exc`` or an error it was raised from is an OS error (a write that failed),
    as opposed to a bug."""
    return any(isinstance(e, OSError) or "os_error_code=" in str(e) for e in _chain(exc))


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or an error it was raised from says the disk or the quota is full."""
    return any(
        (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or any(text in str(e) for text in _DISK_FULL_TEXT)
        for e in _chain(exc)
    )


class _QuietDiskFull(logging.Filter):
    """Orbax logs a full disk with three tracebacks from its threads; the save raises it as
    one line (``Checkpointer._save_failed``), so those log records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not is_disk_full(exc)


logging.getLogger("absl").addFilter(_QuietDiskFull())
