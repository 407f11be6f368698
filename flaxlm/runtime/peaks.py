"""The peak FLOP/s that MFU divides by: published for accelerators, measured once for CPUs.

MFU (model FLOPs utilisation) is, by the convention pod teams compare across stacks (PaLM
appendix B, MaxText), model FLOPs per second over the chip's *published* peak for the compute
dtype. A matmul timed at start-up is neither the bf16 peak of a TPU or GPU nor stable, so on
an accelerator the peak comes from :data:`PUBLISHED` (one row per device kind as jax reports
it, each figure with the vendor page or datasheet it was read from). A device kind that is not
in the table gets no MFU (None) and one warning: never a guess.

A CPU has no published peak worth the name, so it is measured (:func:`measure_cpu_peak`) in
the model's compute dtype, as the model runs its matmuls (inputs in that dtype, float32
accumulation), long and repeated enough to hold still, and cached per machine and dtype
(:func:`cpu_peak`; ``$XDG_CACHE_HOME/flaxlm/peaks.json``, else ``~/.cache/flaxlm``), so every
later run on the machine divides by the same number.

    peak = run_peak(jax.devices(), "bfloat16")  # origin "published:TPU v5 lite:bf16" on a v5e
    mfu = model_flops_per_s / peak.total  # peak.total: the per-chip peak times the chips
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

T = 1e12
_TPU_DOCS = "Google Cloud, Cloud TPU documentation, '{}' page (peak compute per chip)"
_SPARSE = "; the datasheet's figures are with sparsity, dense = half"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (dense Tensor Core figures)"
_H100_SXM = "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column" + _SPARSE
_H100_PCIE = "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column" + _SPARSE
_B200 = "NVIDIA HGX B200 datasheet (8 GPUs; per GPU = 1/8)" + _SPARSE

# device_kind -> compute dtype -> (peak FLOP/s (int8: OP/s) per chip, dense, where it is from).
# The kinds are what jax's devices report: the abstract devices of `flaxlm plan --target`
# (v4:2x2x1 -> "TPU v4", v5e -> "TPU v5 lite", v5p -> "TPU v5", v6e -> "TPU v6 lite";
# flaxlm/tools/gpu_targets.py's H100, A100, B200) and the names real GPUs report.
_V4 = {d: (275 * T, _TPU_DOCS.format("TPU v4")) for d in ("bf16", "int8")}
_V5E = {
    "bf16": (197 * T, _TPU_DOCS.format("TPU v5e")),
    "int8": (394 * T, _TPU_DOCS.format("TPU v5e")),
}
_V5P = {
    "bf16": (459 * T, _TPU_DOCS.format("TPU v5p")),
    "int8": (918 * T, _TPU_DOCS.format("TPU v5p")),
}
_V6E = {
    "bf16": (918 * T, _TPU_DOCS.format("TPU v6e")),
    "int8": (1836 * T, _TPU_DOCS.format("TPU v6e")),
}
_A100_ROW = {"bf16": (312 * T, _A100), "fp16": (312 * T, _A100), "int8": (624 * T, _A100)}
_H100_SXM_ROW = {
    "bf16": (989.5 * T, _H100_SXM),
    "fp16": (989.5 * T, _H100_SXM),
    "fp8": (1979 * T, _H100_SXM),
    "int8": (1979 * T, _H100_SXM),
}
_H100_PCIE_ROW = {
    "bf16": (756.5 * T, _H100_PCIE),
    "fp16": (756.5 * T, _H100_PCIE),
    "fp8": (1513 * T, _H100_PCIE),
    "int8": (1513 * T, _H100_PCIE),
}
_B200_ROW = {
    "bf16": (2250 * T, _B200),
    "fp16": (2250 * T, _B200),
    "fp8": (4500 * T, _B200),
    "int8": (4500 * T, _B200),
}
PUBLISHED: dict[str, dict[str, tuple[float, str]]] = {
    "TPU v4": _V4,
    "TPU v5 lite": _V5E,
    "TPU v5e": _V5E,
    "TPU v5": _V5P,  # v5p: the topology's devices say "TPU v5"
    "TPU v5p": _V5P,
    "TPU v6 lite": _V6E,
    "TPU v6e": _V6E,
    "NVIDIA A100-SXM4-80GB": _A100_ROW,
    "NVIDIA A100-SXM4-40GB": _A100_ROW,
    "NVIDIA A100-PCIE-40GB": _A100_ROW,
    "NVIDIA A100 80GB PCIe": _A100_ROW,
    "NVIDIA H100 80GB HBM3": _H100_SXM_ROW,
    "NVIDIA H100 PCIe": _H100_PCIE_ROW,
    "NVIDIA B200": _B200_ROW,
}
_DTYPE_NAMES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "float32": "fp32",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
    "int8": "int8",
}
PROBE_VERSION = 1  # bump when the probe changes, so older cached figures are not reused
_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Peak:
    """The peak one device (TPU/GPU: a chip; CPU: the whole machine) reaches, where the
    figure comes from (``published:<device kind>:<dtype>`` or ``measured:cpu:<dtype>``),
    and how many such devices the run uses; MFU divides by :attr:`total`."""

    flops: float
    origin: str
    devices: int = 1

    @property
    def total(self) -> float:
        return self.flops * self.devices


def dtype_name(dtype: Any) -> str:
    """The short name the table uses (``bfloat16`` -> ``bf16``); unknown names pass through."""
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    return _DTYPE_NAMES.get(name, name)


def published_peak(device_kind: str, dtype: Any) -> Peak | None:
    """The published per-chip peak of ``device_kind`` in ``dtype``; None when the table has
    no such kind or the chip publishes no figure for that dtype (e.g. float32 on a TPU)."""
    name = dtype_name(dtype)
    row = PUBLISHED.get(device_kind, {}).get(name)
    return None if row is None else Peak(row[0], f"published:{device_kind}:{name}")


def warn_unknown(device_kind: str, dtype: Any) -> None:
    """One warning per (device kind, dtype) in a process: MFU will be absent."""
    key = (device_kind, dtype_name(dtype))
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"no published {key[1]} peak for device kind {device_kind!r} "
        f"(known: {', '.join(sorted(PUBLISHED))}): MFU is left out",
        stacklevel=3,
    )


def chips(devices: Sequence[Any]) -> int:
    """Chips under ``devices``: a topology with a device per TensorCore (TPU v4's abstract
    devices, ``core_on_chip`` 0 and 1) has two devices per chip; the table is per chip."""
    per_chip = 1 + max(int(getattr(d, "core_on_chip", 0) or 0) for d in devices)
    return max(len(devices) // per_chip, 1)


def run_peak(devices: Sequence[Any], dtype: Any, cache_path: Path | None = None) -> Peak | None:
    """The peak a run on ``devices`` computing in ``dtype`` is measured against: the CPU
    probe (cached; the machine counts once, however many simulated devices share it), else
    the published per-chip peak times the chips; None (and one warning) when unknown."""
    first = devices[0]
    if first.platform == "cpu":
        return cpu_peak(dtype, cache_path)
    peak = published_peak(first.device_kind, dtype)
    if peak is None:
        warn_unknown(first.device_kind, dtype)
        return None
    return Peak(peak.flops, peak.origin, chips(devices))


# --- the CPU probe ---------------------------------------------------------------------------


def measure_cpu_peak(
    dtype: Any = "float32", n: int = 2048, rounds: int = 8, round_s: float = 0.25
) -> float:
    """FLOP/s of the model's kind of matmul (``n x n`` inputs in ``dtype``, float32
    accumulation, jitted) on the default device: the best of ``rounds`` rounds of about
    ``round_s`` seconds of back-to-back matmuls each.

    Why the best round, not one timing or the median: a single 2048^2 matmul takes tens of
    milliseconds, so one timing moves with every scheduler hiccup; other load only ever slows
    a round, so the fastest of several long rounds is what the machine can do whenever some
    round runs undisturbed (tests/test_peaks.py checks the estimator on a simulated loaded
    machine; under steady heavy load no round is undisturbed: docs/benchmarks.md)."""
    import jax
    import jax.numpy as jnp

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
    dims = (((1,), (0,)), ((), ()))
    matmul = jax.jit(
        lambda x, y: jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32)
    )
    matmul(a, b).block_until_ready()  # compiles

    def run_calls(calls: int) -> None:
        for _ in range(calls):
            out = matmul(a, b)
        out.block_until_ready()

    return best_round_rate(run_calls, 2.0 * n**3, rounds, round_s)


def best_round_rate(
    run_calls: Callable[[int], None],
    flops_per_call: float,
    rounds: int,
    round_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """The probe's estimator: one call times the work, then ``rounds`` rounds of as many
    back-to-back calls (``run_calls(k)`` runs k and waits) as fill ``round_s``; returns the
    fastest round's FLOP/s."""
    t0 = clock()
    run_calls(1)
    calls = max(1, round(round_s / max(clock() - t0, 1e-9)))
    best = 0.0
    for _ in range(rounds):
        t0 = clock()
        run_calls(calls)
        best = max(best, flops_per_call * calls / max(clock() - t0, 1e-12))
    return best


def default_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "flaxlm" / "peaks.json"


def machine_key(dtype: Any) -> str:
    """What a measured CPU peak depends on: CPU model, the cores this process may use, the
    machine's CPU count, the jax version, the dtype and the probe's version."""
    import jax

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu_model()}|cores={cores}/{os.cpu_count()}|jax={jax.__version__}"
        f"|{dtype_name(dtype)}|probe={PROBE_VERSION}"
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peak(
    dtype: Any,
    cache_path: Path | None = None,
    measure: Callable[[Any], float] = measure_cpu_peak,
) -> Peak:
    """The machine's measured peak in ``dtype``, from the cache when this machine and dtype
    have one, else measured now (a few seconds) and cached (atomically: a run killed while
    writing leaves the old file)."""
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    key, origin = machine_key(dtype), f"measured:cpu:{dtype_name(dtype)}"
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), int | float):
        return Peak(float(entry["flops"]), origin)
    flops = float(measure(dtype))
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    _write_cache(path, key, {"flops": flops, "measured_at": when})
    return Peak(flops, origin)


def raise_cpu_peak(dtype: Any, flops: float, cache_path: Path | None = None) -> bool:
    """Records a probe of ``flops`` in ``dtype`` taken on this machine (``flaxlm bench``'s
    before/after probes): the cached peak becomes the larger of the two. Other load only ever
    slows a probe, so the best one seen is the closest to what the machine can do, and a peak
    cached on a busy machine (MFU reading high) heals with the next bench on a quieter one.
    Returns whether the cache changed."""
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    key = machine_key(dtype)
    entry = _read_cache(path).get(key)
    cached = entry.get("flops") if isinstance(entry, dict) else None
    if isinstance(cached, int | float) and cached >= flops:
        return False
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    _write_cache(path, key, {"flops": float(flops), "measured_at": when})
    return True


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read_cache(path), key: entry}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".peaks.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: measure again next time
        warnings.warn(f"could not cache the CPU peak in {path}: {exc}", stacklevel=3)
