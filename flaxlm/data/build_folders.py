"""Building a cache folder so that a crash never leaves half of one.

A build runs in a temporary folder ``<root>/.build-<key>-<host>-<pid>-*`` and is renamed to
``<root>/<key>`` when complete (:func:`build_atomically`); processes that race to build the
same key agree on one result. A build folder left by a killed process is removed on the next
start (:func:`remove_stale_builds`): at once when its process (same host) is gone, after
``STALE_BUILD_S`` without writes when it was another host's.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from flaxlm.runtime.pids import pid_alive

# Another host's build folder with no write for this long is taken for a killed build.
# Long: training a tokenizer on a large corpus writes nothing for a while.
STALE_BUILD_S = 24 * 3600
HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())  # as it appears in build folders
_BUILD_NAME = re.compile(r"\.build-[0-9a-f]+-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[a-z0-9_]+")


def build_atomically(final: Path, build: Callable[[Path], None], complete_mark: str) -> None:
    """Runs ``build(folder)`` in a fresh build folder beside ``final`` and renames it to
    ``final``. ``complete_mark``: the file a finished build has; when another process has
    renamed its build into place first, ours is dropped (the two are identical). On any error
    or interrupt the build folder is removed."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-{HOST}-{os.getpid()}-", dir=root))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / complete_mark).is_file():
                raise
            shutil.rmtree(tmp)  # another process finished first; its cache is identical
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_builds(root: Path) -> list[Path]:
    """Removes the ``.build-*`` folders of ``root`` that no live process is writing: those of
    a process of this host that is gone, and any other with no write for ``STALE_BUILD_S``.
    Returns the removed folders."""
    if not root.is_dir():
        return []
    removed = []
    for folder in root.glob(".build-*"):
        owner = _BUILD_NAME.fullmatch(folder.name)
        if owner and owner["host"] == HOST:
            stale = not pid_alive(int(owner["pid"]))
        else:  # another host's build, or one named before pids were
            stale = time.time() - _last_write(folder) > STALE_BUILD_S
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _last_write(folder: Path) -> float:
    """The newest modification time of the folder and the files in it."""
    times = [folder.stat().st_mtime]
    for path in folder.rglob("*"):
        try:
            times.append(path.stat().st_mtime)
        except OSError:  # removed meanwhile
            continue
    return max(times)
