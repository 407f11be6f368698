"""Tests for flaxlm.runtime.host_memory: the re-executed process maps big malloc blocks with huge
pages, and the environment it is given."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flaxlm.runtime.host_memory import (
    THP_SETTING,
    TUNABLE,
    glibc_has_hugetlb,
    runs_on_cpu,
    transparent_huge_pages,
    tuned_environment,
)

# Re-executes like the CLI, then mallocs 256 MB as XLA does with a step's temporaries; prints
# the tunables in force and whether the kernel marked that mapping for huge pages (the "hg"
# VmFlag that glibc's madvise(MADV_HUGEPAGE) sets). Whether the kernel then finds free huge
# pages depends on the machine's fragmentation, not on flaxlm, so the test reads the flag, not
# the page-fault count. (Not numpy: it asks the kernel for huge pages itself.)
MAPPING = """
import ctypes, os
from flaxlm.runtime.host_memory import reexec_with_huge_pages
reexec_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
address = libc.malloc(1 << 28)
ctypes.memset(address, 1, 1 << 28)
flags = "-"
with open("/proc/self/smaps") as smaps:
    inside = False
    for line in smaps:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            flags = ",".join(line.split()[1:])
print(os.environ.get("GLIBC_TUNABLES", "-"), flags)
"""


def _mapping(malloc: str) -> tuple[str, list[str]]:
    env = {**os.environ, "FLAXLM_MALLOC": malloc, "JAX_PLATFORMS": "cpu"}
    env.pop("GLIBC_TUNABLES", None)
    done = subprocess.run([sys.executable, "-c", MAPPING], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    tunables, flags = done.stdout.split()
    return tunables, flags.split(",")


def _thp_on_request() -> bool:
    try:
        return "[madvise]" in THP_SETTING.read_text()
    except OSError:
        return False


@pytest.mark.skipif(
    not glibc_has_hugetlb() or not _thp_on_request(),
    reason="needs glibc >= 2.35 and transparent huge pages on madvise (with 'always' every "
    "mapping gets them and there is nothing to ask)",
)
def test_the_reexecuted_process_asks_for_huge_pages():
    tunables, flags = _mapping("auto")
    assert tunables == TUNABLE and "hg" in flags
    tunables, flags = _mapping("system")
    assert tunables == "-" and "hg" not in flags and "rd" in flags


def test_the_tunable_is_added_once_and_only_where_it_helps():
    cpu = {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}
    env = tuned_environment(cpu)
    if not glibc_has_hugetlb() or not transparent_huge_pages():
        assert env is None
        return
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=4:{TUNABLE}"
    assert tuned_environment(env) is None  # the re-executed child does not go again
    assert tuned_environment({**cpu, "FLAXLM_MALLOC": "system"}) is None
    gpu = {"JAX_PLATFORMS": "cuda,cpu"}
    assert tuned_environment(gpu) is None
    assert tuned_environment({**gpu, "FLAXLM_MALLOC": "hugepages"})["GLIBC_TUNABLES"] == TUNABLE


def test_jax_platforms_decides_where_jax_runs():
    assert runs_on_cpu({"JAX_PLATFORMS": "cpu"})
    assert not runs_on_cpu({"JAX_PLATFORMS": "tpu"})


def test_a_bad_setting_is_named():
    with pytest.raises(ValueError, match="FLAXLM_MALLOC='on' is not one of auto, hugepages"):
        tuned_environment({"FLAXLM_MALLOC": "on"})
