"""Whether a process of this host is alive: how stale locks and build folders left by a killed
process are told from live ones (flaxlm/train/run_lock.py, flaxlm/data/build_folders.py)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` of this host exists (another user's included)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
