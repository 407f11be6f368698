"""Compile targets: the abstract devices of a named TPU topology, and the facts of its chip.

With libtpu installed (``pip install -e '.[tpu]'``) the real TPU compiler runs on any machine:
``jax.experimental.topologies`` describes a topology such as ``v5e:8x8`` as devices that can
be compiled for but not run on. A mesh over them, abstract arguments with shardings, and
``jit(...).lower(...).compile()`` give the TPU compiler's own memory and cost analyses.

    devices = tpu_devices("v5e:2x2", slices=2)       # 8 devices, slice_index 0 and 1
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

from flaxlm.config import ConfigError
from flaxlm.runtime.accelerators import tpu_compiler_environment

GIB = 1024**3
EXAMPLES = ("v5e:2x2", "v5e:8x8", "v5p:4x4x4", "v6e:4x4", "v4:2x2x1")
# HBM per chip, by the device_kind the topology's devices report (v5e / v6e are "lite").
HBM_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,
    "TPU v5": 95 * GIB,  # v5p
    "TPU v5p": 95 * GIB,
    "TPU v6 lite": 32 * GIB,  # v6e
}
ESTIMATE_LEAVES_OUT = (
    "custom kernels: the FLOPs and time of Pallas / Mosaic kernels (such as splash attention) "
    "are not counted; a loop's body (model.scan_layers, train.grad_accum > 1) counts once, "
    "not once per iteration; it is XLA's roofline estimate of the compiled step, not a "
    "measurement"
)


def libtpu_installed() -> bool:
    path = os.environ.get("TPU_LIBRARY_PATH")
    return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: str, slices: int = 1) -> list[Any]:
    """The abstract devices of ``slices`` copies of TPU ``topology`` (``slice_index`` tells
    them apart when ``slices > 1``). One-line errors for a name libtpu does not know and for
    a missing libtpu."""
    if slices < 1:
        raise ConfigError(f"--slices {slices} must be >= 1")
    if not libtpu_installed():
        raise ConfigError(
            f"compiling for TPU topology {topology!r} needs libtpu: pip install -e '.[tpu]'"
        )
    tpu_compiler_environment(topology)
    from jax.experimental import topologies

    kwargs = {"num_slices": slices} if slices > 1 else {}
    try:
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except Exception as exc:  # libtpu's JaxRuntimeError: INVALID_ARGUMENT ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"--target {topology!r} is not a TPU topology libtpu can compile for "
            f"(e.g. {', '.join(EXAMPLES)}): {reason}"
        ) from None
    return list(topo.devices)


def devices_per_chip(devices: Sequence[Any]) -> int:
    """2 where the topology has one device per TensorCore (v4, v2/v3), else 1."""
    return 1 + max(int(getattr(d, "core_on_chip", 0)) for d in devices)


def chip_hbm_bytes(device_kind: str) -> int | None:
    """HBM of one chip of ``device_kind`` (None for a kind not in :data:`HBM_BYTES`)."""
    return HBM_BYTES.get(device_kind)
