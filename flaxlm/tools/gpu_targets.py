"""NVIDIA GPU compile targets: described GPUs that the real XLA GPU compiler compiles for on a
machine with no GPU ("deviceless" compilation).

With the CUDA plugin installed (``pip install -e '.[cuda12]'``), ``jax.experimental.topologies``
turns a ``GpuTargetConfigProto`` (the facts the compiler would read from a GPU: SMs, shared
memory, registers, memory size, compute capability, cuDNN version) into abstract devices, one
per GPU of ``hosts x gpus``. A mesh over them, abstract arguments with shardings, and
``jit(...).lower(...).compile()`` give the GPU compiler's own program: its memory analysis and
its cuDNN and Triton kernels. Nothing runs.

    devices = gpu_devices("h100:2x8")   # 16 abstract H100s, process_index 0 and 1

Every figure below is in :data:`GPUS`, from the vendors' published specifications (NVIDIA's
H100, A100 and DGX B200 datasheets and the CUDA programming guide's per-compute-capability
table): one place to check or add a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flaxlm.config import ConfigError

GIB = 1024**3
KIB = 1024


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model, as the XLA GPU compiler needs it described."""

    description: str  # what the device reports as its name (device_kind)
    compute_capability: tuple[int, int]
    sms: int  # streaming multiprocessors
    fp32_lanes_per_sm: int
    clock_ghz: float  # boost clock
    memory_bytes: int  # HBM per GPU, as published
    memory_bandwidth: int  # bytes / s
    l2_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    # The CUDA toolkit the target is described with (jax[cuda12] 0.10.2 installs 12.9).
    cuda: tuple[int, int] = (12, 9)


GPUS: dict[str, GpuSpec] = {
    # H100 SXM5 80 GB: 132 SMs x 128 FP32 lanes, 1.98 GHz boost, 80 GB HBM3 at 3.35 TB/s,
    # 50 MB L2; compute capability 9.0: 228 KB shared memory per SM, 227 KB per block.
    "h100": GpuSpec(
        description="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        sms=132,
        fp32_lanes_per_sm=128,
        clock_ghz=1.98,
        memory_bytes=80 * GIB,
        memory_bandwidth=3_350_000_000_000,
        l2_bytes=50 * 1024 * KIB,
        shared_memory_per_sm=228 * KIB,
        shared_memory_per_block_optin=227 * KIB,
    ),
    # A100 SXM4 80 GB: 108 SMs x 64 FP32 lanes, 1.41 GHz boost, 80 GB HBM2e at 2.039 TB/s,
    # 40 MB L2; compute capability 8.0: 164 KB shared memory per SM, 163 KB per block.
    "a100": GpuSpec(
        description="NVIDIA A100-SXM4-80GB",
        compute_capability=(8, 0),
        sms=108,
        fp32_lanes_per_sm=64,
        clock_ghz=1.41,
        memory_bytes=80 * GIB,
        memory_bandwidth=2_039_000_000_000,
        l2_bytes=40 * 1024 * KIB,
        shared_memory_per_sm=164 * KIB,
        shared_memory_per_block_optin=163 * KIB,
    ),
    # B200 (DGX B200: 8 GPUs, 1,440 GB HBM3e, 64 TB/s): 180 GB and 8 TB/s per GPU, 148 SMs x
    # 128 FP32 lanes, 126 MB L2 (two dies); compute capability 10.0: 228 KB shared memory per
    # SM, 227 KB per block. Boost clock taken as 1.965 GHz (NVIDIA publishes the TFLOPS,
    # not the clock); it only steers the compiler's cost model, not memory.
    "b200": GpuSpec(
        description="NVIDIA B200",
        compute_capability=(10, 0),
        sms=148,
        fp32_lanes_per_sm=128,
        clock_ghz=1.965,
        memory_bytes=180 * GIB,
        memory_bandwidth=8_000_000_000_000,
        l2_bytes=126 * 1024 * KIB,
        shared_memory_per_sm=228 * KIB,
        shared_memory_per_block_optin=227 * KIB,
    ),
}
EXAMPLES = ("h100:8", "h100:2x8", "a100:8", "b200:8")
# The cuDNN the target is described with: what jax[cuda12] 0.10.2 installs (9.28).
CUDNN_VERSION = (9, 28)


def is_gpu_target(target: str) -> bool:
    """Whether ``target`` names a GPU model of :data:`GPUS` (``h100:8``, ``a100:2x8``, ...)."""
    return target.split(":", 1)[0].strip().lower() in GPUS


def parse_gpu_target(target: str) -> tuple[str, int, int]:
    """``"h100:2x8"`` -> ``("h100", 2, 8)``: the GPU model, hosts, GPUs per host (``h100:8``
    is one host of 8)."""
    match = re.fullmatch(r"([a-z0-9]+):(?:(\d+)x)?(\d+)", target.strip().lower())
    if not match or match.group(1) not in GPUS:
        raise ConfigError(
            f"--target {target!r} is not a GPU target: MODEL:GPUS or MODEL:HOSTSxGPUS with "
            f"MODEL one of {', '.join(GPUS)} (e.g. {', '.join(EXAMPLES)})"
        )
    hosts, gpus = int(match.group(2) or 1), int(match.group(3))
    if hosts < 1 or gpus < 1:
        raise ConfigError(f"--target {target!r}: hosts and GPUs per host must be >= 1")
    return match.group(1), hosts, gpus


def cuda_plugin_installed() -> bool:
    """Whether jax's CUDA plugin (the XLA GPU compiler) is installed."""
    return any(
        importlib.util.find_spec(name) is not None
        for name in ("jax_cuda12_plugin", "jax_cuda13_plugin")
    )


def target_config_text(spec: GpuSpec) -> str:
    """``spec`` as a ``stream_executor.GpuTargetConfigProto`` in text form."""
    major, minor = spec.compute_capability
    info = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * KIB,
        "shared_memory_per_core": spec.shared_memory_per_sm,
        "threads_per_core_limit": 2048,
        "core_count": spec.sms,
        "fpus_per_core": spec.fp32_lanes_per_sm,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": spec.memory_bandwidth,
        "l2_cache_size": spec.l2_bytes,
        "clock_rate_ghz": spec.clock_ghz,
        "device_memory_size": spec.memory_bytes,
        "shared_memory_per_block_optin": spec.shared_memory_per_block_optin,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
    cuda_major, cuda_minor = spec.cuda
    return (
        f"gpu_device_info {{\n{fields}\n"
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
        f'platform_name: "CUDA"\n'
        f"runtime_version {{ major: {cuda_major} minor: {cuda_minor} patch: 0 }}\n"
        f"dnn_version_info {{ major: {CUDNN_VERSION[0]} minor: {CUDNN_VERSION[1]} }}\n"
        f'device_description_str: "{spec.description}"\n'
    )


def gpu_devices(target: str) -> list[Any]:
    """The abstract devices of ``target`` (``h100:8``, ``h100:2x8``...), host by host: the
    devices of host ``i`` have ``process_index`` i. One-line errors for an unknown target and
    for a missing CUDA plugin."""
    model, hosts, gpus = parse_gpu_target(target)
    if not cuda_plugin_installed():
        raise ConfigError(
            f"compiling for GPU target {target!r} needs jax's CUDA plugin: "
            "pip install -e '.[cuda12]'"
        )
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(
            f"flaxlm-{model}",
            "cuda",
            target_config=target_config_text(GPUS[model]),
            topology=f"1x{hosts}x{gpus}",
        )
    except Exception as exc:  # the plugin's JaxRuntimeError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--target {target!r}: the CUDA plugin refused it: {reason}") from None
    devices = sorted(topo.devices, key=lambda d: (d.process_index, d.id))
    return devices


def gpu_spec(target: str) -> GpuSpec:
    """The :class:`GpuSpec` of ``target``'s GPU model."""
    return GPUS[parse_gpu_target(target)[0]]


def kernel_counts(hlo_text: str) -> dict[str, int]:
    """cuDNN and Triton kernel calls in a compiled GPU program's HLO text.

    cuDNN: custom calls whose target starts with ``__cudnn`` (fused attention forward and
    backward, cuDNN GEMM fusions); Triton: Pallas GPU kernels (``__gpu$xla.gpu.triton``
    custom calls). XLA's own Triton-emitted fusions (``kind=kCustom`` with a
    ``__triton`` backend config) are counted apart, as ``xla_triton_fusions``.
    """
    custom_targets = re.findall(r'custom_call_target="([^"]+)"', hlo_text)
    return {
        "cudnn_kernels": sum(t.startswith("__cudnn") for t in custom_targets),
        "cudnn_attention_kernels": sum(t.startswith("__cudnn$fmha") for t in custom_targets),
        "triton_kernels": sum("triton" in t for t in custom_targets),
        "xla_triton_fusions": len(re.findall(r'"kind":"__triton', hlo_text)),
    }


@contextlib.contextmanager
def no_cache_writes() -> Iterator[None]:
    """Compiles inside store nothing in JAX's persistent compilation cache: an executable
    compiled for described GPUs cannot be loaded back from it (its reader needs a GPU
    client), so an entry would only cost a write now and a warning at the next compile."""
    import jax

    name = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, name)
    jax.config.update(name, float("inf"))
    try:
        yield
    finally:
        jax.config.update(name, before)


def compile_for_gpus(lowered) -> tuple[Any, bool]:
    """``(compiled, triton_gemm)``: ``lowered`` compiled for described GPUs (nothing stored in
    the persistent cache, see :func:`no_cache_writes`). XLA's Triton GEMM emitter, without a
    GPU to autotune on, finds no tiling for some fp32 matmuls whose rows are no power of two
    ("Couldn't find output tile sizes", e.g. f32[48,64] at 24 positions); those programs are
    compiled again with cuBLAS GEMMs (``xla_gpu_enable_triton_gemm=false``), and
    ``triton_gemm`` says so (False)."""
    with no_cache_writes():
        try:
            return lowered.compile(), True
        except Exception as exc:  # jax.errors.JaxRuntimeError: INTERNAL
            if "Couldn't find output tile sizes" not in str(exc):
                raise
        return lowered.compile({"xla_gpu_enable_triton_gemm": False}), False
