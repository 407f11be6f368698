"""Huge pages for glibc's malloc when jax runs on the CPU, so XLA's per-step buffers are not
faulted in 4 KiB at a time.

XLA:CPU allocates an executable's temporaries with ``malloc`` on every run and frees them at
the end (hundreds of MB per step for ``configs/bench/gpt_small_cpu.yaml``). glibc serves a
block that large with a fresh ``mmap`` and returns it with ``munmap``, so on every step the
kernel faults in every page of it anew, paid by whichever kernel first writes each buffer.
glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) maps those blocks with
transparent huge pages: far fewer faults, and a faster CPU step (benchmarks/RESULTS.md,
"Huge pages for malloc").

glibc reads tunables when a process starts, so the ``flaxlm`` command re-executes itself
once with the tunable added to ``GLIBC_TUNABLES`` (same PID, same arguments) before it does
anything else. When you drive flaxlm from Python, start the interpreter with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` yourself.

``FLAXLM_MALLOC``: ``auto`` (the default) applies it when jax will run on the CPU
(``JAX_PLATFORMS=cpu``, or no accelerator attached or no GPU/TPU plugin installed; on
accelerators the big buffers live on the device), ``hugepages`` always, ``system`` never.

Measured and not taken: keeping freed blocks in the heap (``mallopt``: no ``mmap``, one
arena) removes the faults too, but one arena's lock slows XLA's multi-threaded compiles
(benchmarks/RESULTS.md, "Huge pages for malloc").
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

from flaxlm.runtime.accelerators import accelerator_attached

TUNABLE = "glibc.malloc.hugetlb=1"
CHOICES = ("auto", "hugepages", "system")
ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu", "jax-metal")
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_REEXECUTED = "FLAXLM_MALLOC_REEXECUTED"  # set in the child: never re-execute twice


def tuned_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to change."""
    choice = env.get("FLAXLM_MALLOC", "auto")
    if choice not in CHOICES:
        raise ValueError(f"FLAXLM_MALLOC={choice!r} is not one of {', '.join(CHOICES)}")
    tunables = env.get("GLIBC_TUNABLES", "")
    if choice == "system" or _REEXECUTED in env or "glibc.malloc.hugetlb" in tunables:
        return None
    if (choice == "auto" and not runs_on_cpu(env)) or not glibc_has_hugetlb():
        return None
    if not transparent_huge_pages():
        return None  # the tunable would do nothing
    joined = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return {**env, "GLIBC_TUNABLES": joined, _REEXECUTED: "1"}


def reexec_with_huge_pages() -> None:
    """Replaces this process by itself with :func:`tuned_environment` (when that changes
    anything). Call it first thing in a program's entry point, never from a library call:
    whatever ran before is started again."""
    env = tuned_environment(os.environ)
    if env is not None:
        try:
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
        except OSError:
            pass  # run on without huge pages rather than not at all


def huge_pages_in_force() -> bool:
    """Whether this process started with the tunable (as ``flaxlm`` re-executes itself)."""
    return glibc_has_hugetlb() and TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def runs_on_cpu(env: Mapping[str, str]) -> bool:
    """Whether jax will pick the CPU, judged without starting it."""
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if not accelerator_attached():  # an installed plugin (libtpu) without a device: the CPU
        return True
    names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
    return not any(name.lower().startswith(ACCELERATOR_PLUGINS) for name in names)


def transparent_huge_pages() -> bool:
    """Whether the kernel grants huge pages to the regions malloc asks for (``always`` or
    ``madvise`` in /sys/kernel/mm/transparent_hugepage/enabled)."""
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def glibc_has_hugetlb() -> bool:
    """Linux with glibc >= 2.35, the first with the ``glibc.malloc.hugetlb`` tunable."""
    libc, version = platform.libc_ver()
    if sys.platform != "linux" or libc != "glibc":
        return False
    major, minor = (int(part) for part in version.split(".")[:2])
    return (major, minor) >= (2, 35)
