"""Tests for flaxlm.runtime.host_memory: the re-executed process maps big malloc blocks with huge
pages, and the environment it is given."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flaxlm.runtime.host_memory import (
    TUNABLE,
    glibc_has_hugetlb,
    runs_on_cpu,
    transparent_huge_pages,
    tuned_environment,
)

# Re-executes like the CLI, then mallocs and writes 256 MB as XLA does with a step's
# temporaries; prints the tunables in force and the page faults. (Not numpy: it asks the
# kernel for huge pages itself, which would hide the difference.)
FAULTS = """
import ctypes, os, resource
from flaxlm.runtime.host_memory import reexec_with_huge_pages
reexec_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(1 << 28), 1, 1 << 28)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(os.environ.get("GLIBC_TUNABLES", "-"), faults)
"""


def _faults(malloc: str) -> tuple[str, int]:
    env = {**os.environ, "FLAXLM_MALLOC": malloc, "JAX_PLATFORMS": "cpu"}
    env.pop("GLIBC_TUNABLES", None)
    done = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    tunables, faults = done.stdout.split()
    return tunables, int(faults)


@pytest.mark.skipif(
    not glibc_has_hugetlb() or not transparent_huge_pages(),
    reason="needs glibc >= 2.35 and transparent huge pages",
)
def test_the_reexecuted_process_faults_in_huge_pages():
    pages = (1 << 28) // 4096
    tunables, faults = _faults("auto")
    assert tunables == TUNABLE and faults < pages // 20
    tunables, faults = _faults("system")
    assert tunables == "-" and faults > pages // 2


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
