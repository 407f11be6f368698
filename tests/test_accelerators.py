"""flaxlm.runtime.accelerators: jax is kept on the CPU where no accelerator is attached, so an
installed libtpu stays unloaded (no warnings, no lock file), and libtpu serves as a compiler
for TPU topologies without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flaxlm.runtime.accelerators import (
    accelerator_attached,
    prefer_cpu_without_accelerators,
    tpu_chips,
    tpu_compiler_environment,
)


def _pci_device(root: Path, name: str, vendor: str, device: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "vendor").write_text(vendor + "\n")
    (root / name / "device").write_text(device + "\n")


def test_tpu_chips_are_counted_by_their_pci_ids(tmp_path):
    _pci_device(tmp_path, "0000:00:04.0", "0x1ae0", "0x0063")  # a v5e chip
    _pci_device(tmp_path, "0000:00:05.0", "0x1ae0", "0x0063")
    _pci_device(tmp_path, "0000:00:06.0", "0x1ae0", "0x0042")  # Google's gVNIC: no TPU
    _pci_device(tmp_path, "0000:00:07.0", "0x8086", "0x0063")
    assert tpu_chips(str(tmp_path)) == 2


def test_jax_platforms_is_set_only_when_nothing_is_named_or_attached():
    env: dict[str, str] = {}
    assert prefer_cpu_without_accelerators(env) is not accelerator_attached()
    if not accelerator_attached():
        assert env == {"JAX_PLATFORMS": "cpu"}
    named = {"JAX_PLATFORMS": "tpu"}
    assert not prefer_cpu_without_accelerators(named) and named == {"JAX_PLATFORMS": "tpu"}


@pytest.mark.skipif(accelerator_attached(), reason="this machine has an accelerator")
def test_the_tpu_compiler_environment_adds_only_what_is_missing():
    env = {"TPU_WORKER_HOSTNAMES": "mine"}
    added = tpu_compiler_environment("v5p:4x4x4", env)
    assert added == {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_ACCELERATOR_TYPE": "v5p-128"}
    assert env["TPU_WORKER_HOSTNAMES"] == "mine"
    assert tpu_compiler_environment("v5e:8x8", {})["TPU_ACCELERATOR_TYPE"] == "v5litepod-64"


@pytest.mark.skipif(accelerator_attached(), reason="this machine has an accelerator")
def test_importing_flaxlm_keeps_jax_quiet_on_the_cpu():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    code = "import flaxlm, jax; print(jax.default_backend(), len(jax.devices()))"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cpu", "1"]
    assert done.stderr == ""  # no libtpu start-up warnings
