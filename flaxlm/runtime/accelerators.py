"""Which accelerators this machine has, judged from the kernel's device files without
starting jax, and the environment jax and libtpu get from that.

With libtpu installed (``pip install -e '.[tpu]'``; ``make test`` installs it so that the TPU
compile tests run), jax on a machine *without* TPUs still loads libtpu when its backends
start: time, warnings about ``TPU_ACCELERATOR_TYPE`` / ``TPU_WORKER_HOSTNAMES`` on stderr
(benchmarks/RESULTS.md, "libtpu installed, jax on the CPU"), and ``/tmp/libtpu_lockfile``
held for the life of the process — any other process that then loads libtpu to compile for
a TPU topology fails with "Internal error when accessing libtpu multi-process lockfile". So
importing flaxlm, before jax is imported, sets ``JAX_PLATFORMS=cpu`` when no accelerator is attached
(:func:`prefer_cpu_without_accelerators`; an explicit ``JAX_PLATFORMS`` is never touched),
and compiling for a TPU topology without a TPU (``flaxlm plan --target``) loads libtpu in
compiler-only mode (:func:`tpu_compiler_environment`). The TPU compiler works with
``JAX_PLATFORMS=cpu``: ``jax.experimental.topologies.get_topology_desc`` loads libtpu itself.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import MutableMapping
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, 7x; as jax._src.hardware_utils): the
# Google vendor id alone also covers the gVNIC network card.
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
NVIDIA_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")
AMD_DEVICE_FILES = ("/dev/kfd",)
# libtpu's name for a slice of N chips, per topology generation (only to silence its start-up
# warnings: the compiled program follows the topology name, whatever this says)
_ACCELERATOR_TYPES = {
    "v4": "v4-{cores}",
    "v5p": "v5p-{cores}",
    "v5e": "v5litepod-{chips}",
    "v6e": "v6e-{chips}",
}


def tpu_chips(pci_root: str = "/sys/bus/pci/devices") -> int:
    """TPU chips attached through PCI (``/dev/accel*`` counts when /sys is not mounted)."""
    chips = 0
    for vendor in glob.glob(f"{pci_root}/*/vendor"):
        folder = Path(vendor).parent
        try:
            if Path(vendor).read_text().strip() != GOOGLE_PCI_VENDOR:
                continue
            chips += (folder / "device").read_text().strip() in TPU_PCI_DEVICES
        except OSError:
            continue
    return chips or len(glob.glob("/dev/accel[0-9]*"))


def accelerator_attached() -> bool:
    """Whether a TPU, an NVIDIA GPU or an AMD GPU is visible to this process."""
    files = NVIDIA_DEVICE_FILES + AMD_DEVICE_FILES
    return tpu_chips() > 0 or any(os.path.exists(f) for f in files)


def prefer_cpu_without_accelerators(env: MutableMapping[str, str] = os.environ) -> bool:
    """Sets ``JAX_PLATFORMS=cpu`` in ``env`` when it names no platform and no accelerator is
    attached, so that jax does not load an installed libtpu / CUDA plugin only to find no
    device. Returns whether it set it. Effective only before jax is imported."""
    if env.get("JAX_PLATFORMS") or accelerator_attached():
        return False
    env["JAX_PLATFORMS"] = "cpu"
    return True


def tpu_compiler_environment(
    topology: str, env: MutableMapping[str, str] = os.environ
) -> dict[str, str]:
    """What libtpu needs in ``env`` to serve as a compiler for ``topology`` (e.g.
    ``v5e:8x8``) on a machine without TPUs; sets and returns the variables it adds (none on a
    TPU VM, where the runtime's own settings and its lock stay in force).

    ``ALLOW_MULTIPLE_LIBTPU_LOAD``: skip the lock file that guards TPU chips (there are none
    here), so parallel compiles and tests do not fail on each other. ``TPU_WORKER_HOSTNAMES``
    and ``TPU_ACCELERATOR_TYPE``: what libtpu would otherwise look up and warn about.
    """
    if tpu_chips():
        return {}
    added = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost"}
    match = re.fullmatch(r"(v\d+[a-z]*):(\d+)x(\d+)(?:x(\d+))?", topology.strip())
    if match and match.group(1) in _ACCELERATOR_TYPES:
        chips = int(match.group(2)) * int(match.group(3)) * int(match.group(4) or 1)
        kind = _ACCELERATOR_TYPES[match.group(1)]
        added["TPU_ACCELERATOR_TYPE"] = kind.format(chips=chips, cores=2 * chips)
    added = {k: v for k, v in added.items() if k not in env}
    env.update(added)
    return added
