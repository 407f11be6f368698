"""``flaxlm plan``: how much memory one device needs for a config's train step, before
renting the hardware.

The train step is lowered and compiled ahead of time on *abstract* inputs (shapes and
shardings only: nothing is allocated; the batch has the model family's keys and shapes) over
the configured mesh. Without ``--target``, simulated CPU devices stand in for the real ones
and XLA:CPU compiles; parameters and optimizer state are counted from their shardings,
activations and temporaries come from XLA's memory analysis of the compiled program.

With ``--target TOPOLOGY`` (libtpu installed), the mesh is laid over the abstract devices of
that TPU topology (flaxlm/tools/targets.py; ``--slices N`` for a multi-slice job) and the
real TPU compiler compiles the step, Mosaic kernels included: its memory analysis, its
step-time estimate and the chip's HBM are reported (:func:`plan`).

With ``--target h100:8`` (``MODEL:GPUS`` or ``MODEL:HOSTSxGPUS``; models in
flaxlm/tools/gpu_targets.py; jax's CUDA plugin installed) the XLA GPU compiler compiles the
step for described GPUs, cuDNN and Triton kernels included, with no GPU attached; hosts are
the outer (DCN) factor of the data axis, as slices are on TPUs.

    flaxlm plan configs/gpt_7b.yaml --devices 64 --json
    flaxlm plan configs/gpt_7b.yaml --target v5e:8x8 --json
    flaxlm plan configs/gpt_7b.yaml --target h100:2x8 --json
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from flaxlm.config import Config, ConfigError
from flaxlm.families import family_of
from flaxlm.models import count_params
from flaxlm.models.platform import auto_attention
from flaxlm.parallel.sharding import (
    build_mesh,
    micro_batch_sharding,
    replicated,
    resolve_mesh_shape,
)
from flaxlm.tools import compile_oom, gpu_targets
from flaxlm.tools.targets import (
    ESTIMATE_LEAVES_OUT,
    chip_hbm_bytes,
    devices_per_chip,
    tpu_devices,
)
from flaxlm.train.flops import format_plan_mfu
from flaxlm.train.program import TrainProgram
from flaxlm.train.step import step_controls

GIB = 1024**3


def _bytes_per_device(abstract_tree, sharding_tree) -> int:
    """Bytes one device holds: each array's shard shape (the largest shard) times itemsize."""
    total = 0
    for leaf, sharding in zip(
        jax.tree.leaves(abstract_tree), jax.tree.leaves(sharding_tree), strict=True
    ):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def plan(cfg: Config, target: str | None = None, slices: int = 1) -> dict[str, Any]:
    """Compiles the train step for ``cfg`` on abstract inputs; returns per-device bytes.

    Keys: ``bytes_per_device`` (the total), ``params_bytes``, ``opt_state_bytes``,
    ``activations_bytes`` (XLA temporaries: activations, gradients, workspace),
    ``batch_bytes``, ``compile_s``, ``n_params``, ``mesh``, ``devices``. Without ``target``:
    ``bytes_per_device`` = max(arguments, parameters + optimizer state) + temporaries.

    With ``target`` (a TPU topology such as ``v5e:8x8``, ``slices`` copies of it), also
    ``compiler: "tpu"``, ``target``, ``slices``, ``device_kind``, ``hbm_bytes`` (one chip's
    HBM; None for a chip not in the table), ``devices_per_chip`` (2 where the topology has a
    device per TensorCore, as v4's does: each then has half the chip), ``fits``,
    ``step_time_estimate_s`` (XLA's ``optimal_seconds``; None if it gives none),
    ``estimate_leaves_out``, ``attention_impl`` (the configured kernel, ``auto`` resolved for
    TPU: splash, which itself falls back to xla for lengths that are not a multiple of 128),
    ``mosaic_kernels`` (Pallas / Mosaic custom calls in the compiled program: 0 means no
    splash kernel was compiled, whatever ``attention_impl`` says),
    ``arguments_bytes``, ``outputs_bytes``, ``aliased_bytes``, ``generated_code_bytes``.
    There ``bytes_per_device`` is the TPU compiler's peak for the program: arguments +
    outputs - aliased + temporaries (the donated state's outputs reuse its input buffers, so
    they count once; the temporaries are one block into which the compiler packs every
    intermediate value, reusing space between values that are not live at the same time, so
    its size is already the high-water mark, not a sum). The program code itself is left out
    (``generated_code_bytes``, tens of MB at most).

    With a GPU ``target`` (``h100:8``, ``h100:2x8``: flaxlm/tools/gpu_targets.py) the same
    peak, from the XLA GPU compiler, and ``compiler: "gpu"``, ``target``, ``hosts``,
    ``gpus_per_host``, ``dcn`` (the axis the hosts split), ``device_kind``, ``hbm_bytes``
    (one GPU's published memory), ``fits``, ``attention_impl`` (``auto`` resolved for GPU:
    triton), ``cudnn_kernels`` and ``cudnn_attention_kernels`` (cuDNN custom calls; those of
    them that are fused attention), ``triton_kernels`` (Pallas GPU kernels),
    ``xla_triton_fusions``, ``xla_triton_gemm`` (False where XLA's Triton GEMM emitter found
    no tiling for a matmul without a GPU to autotune on, and cuBLAS GEMMs were compiled
    instead: :func:`flaxlm.tools.gpu_targets.compile_for_gpus`), and the four sizes above.
    """
    cfg, devices = _target_devices(cfg, target, slices)
    family = family_of(cfg)
    mesh = None if devices is None else build_mesh(cfg.mesh, devices)
    ms = TrainProgram.build(cfg, family, mesh)
    abstract, state_sh = ms.abstract, ms.shardings
    state_in, batch, controls = _abstract_inputs(cfg, family, ms)
    gpu = target is not None and gpu_targets.is_gpu_target(target)
    lowered = ms.train_step.lower(state_in, batch, controls)
    t0 = time.perf_counter()
    try:
        compiled, triton_gemm = _compile(lowered, gpu)
    except Exception as exc:  # the compiler's JaxRuntimeError
        if target is None or not compile_oom.is_out_of_memory(exc):
            raise
        return _does_not_fit(cfg, ms, batch, (target, slices, gpu), exc, time.perf_counter() - t0)
    compile_s = time.perf_counter() - t0

    params_bytes = _bytes_per_device(abstract.params, state_sh.params)
    opt_bytes = _bytes_per_device(abstract.opt_state, state_sh.opt_state)
    memory = compiled.memory_analysis()
    sizes = {
        name: int(getattr(memory, f"{name}_size_in_bytes", 0)) if memory is not None else 0
        for name in ("temp", "argument", "output", "alias", "generated_code", "host_temp")
    }
    temp, arguments = sizes["temp"], sizes["argument"]
    state_and_batch = max(arguments, params_bytes + opt_bytes)
    report = {
        "bytes_per_device": state_and_batch + temp,
        "params_bytes": params_bytes,
        "opt_state_bytes": opt_bytes,
        "activations_bytes": temp,
        "batch_bytes": max(arguments - params_bytes - opt_bytes, 0),
        "compile_s": compile_s,
        "n_params": count_params(abstract.params),
        "mesh": dict(ms.mesh.shape),
        "devices": ms.mesh.devices.size,
    }
    if target is None:
        return report
    report["bytes_per_device"] = arguments + sizes["output"] - sizes["alias"] + temp
    if gpu:
        report["xla_triton_gemm"] = triton_gemm
        return {**_gpu_fields(cfg, compiled, ms.mesh, sizes, target), **report}
    return {**_tpu_fields(cfg, compiled, ms.mesh, sizes, target, slices), **report}


def _compile(lowered, gpu: bool):
    """The compiled program, and whether XLA's Triton GEMM was kept (GPU only; else None)."""
    return gpu_targets.compile_for_gpus(lowered) if gpu else (lowered.compile(), None)


def _does_not_fit(cfg: Config, ms: TrainProgram, batch, where: tuple, exc, compile_s: float):
    """The report of a program the compiler refused for memory (RESOURCE_EXHAUSTED):
    ``fits: false``, ``activations_bytes`` = the temporaries it asked for, and
    ``bytes_per_device`` = the arguments (state and batch shards) + those temporaries (None
    where the message names no figure); ``compiler_message`` is its line."""
    target, slices, gpu = where
    params_bytes = _bytes_per_device(ms.abstract.params, ms.shardings.params)
    opt_bytes = _bytes_per_device(ms.abstract.opt_state, ms.shardings.opt_state)
    batch_bytes = _bytes_per_device(batch, jax.tree.map(lambda b: b.sharding, batch))
    arguments, asked = params_bytes + opt_bytes + batch_bytes, compile_oom.asked_bytes(str(exc))
    devices = list(ms.mesh.devices.flat)
    kind, per_chip = devices[0].device_kind, devices_per_chip(devices)
    hbm = gpu_targets.gpu_spec(target).memory_bytes if gpu else chip_hbm_bytes(kind)
    impl = cfg.model.attention_impl
    return {
        "compiler": "gpu" if gpu else "tpu",
        "target": target,
        "slices": slices,
        "device_kind": kind,
        "devices": len(devices),
        "devices_per_chip": per_chip,
        "hbm_bytes": None if hbm is None else hbm // per_chip,
        "fits": False,
        "compiler_message": compile_oom.first_line(exc),
        "attention_impl": auto_attention("gpu" if gpu else "tpu") if impl == "auto" else impl,
        "arguments_bytes": arguments,
        "bytes_per_device": None if asked is None else arguments + asked,
        "params_bytes": params_bytes,
        "opt_state_bytes": opt_bytes,
        "activations_bytes": asked,
        "batch_bytes": batch_bytes,
        "compile_s": compile_s,
        "n_params": count_params(ms.abstract.params),
        "mesh": dict(ms.mesh.shape),
    }


def _abstract_inputs(cfg: Config, family, ms: TrainProgram):
    """The train step's arguments as shapes and shardings: state, batch, controls."""
    state_in = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), ms.abstract, ms.shardings
    )
    # The family's batch, with the micro-batch axis the train step takes: shapes only.
    accum = cfg.train.grad_accum
    batch = {
        k: jax.ShapeDtypeStruct(
            (accum, v.shape[0] // accum, *v.shape[1:]), v.dtype,
            sharding=micro_batch_sharding(ms.mesh),
        )
        for k, v in family.synthetic_batch(cfg, np.random.default_rng(0)).items()
    }  # fmt: skip
    controls = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated(ms.mesh))
        for k, v in step_controls().items()
    }
    return state_in, batch, controls


def _target_devices(cfg: Config, target: str | None, slices: int):
    """``(cfg, devices)`` for ``target``: None for the local devices, a TPU topology's or
    a GPU target's abstract devices. A GPU target of several hosts with no DCN factor in
    ``cfg`` gets the hosts as the outer factor of the data axis (``mesh.dcn_data`` = hosts)
    where they divide it, else of the fsdp axis (an FSDP-only mesh such as gpt_7b's)."""
    if target is None:
        if slices != 1:
            raise ConfigError(f"--slices {slices} needs --target (a TPU topology)")
        return cfg, None
    if not gpu_targets.is_gpu_target(target):
        return cfg, tpu_devices(target, slices)
    if slices != 1:
        raise ConfigError(
            f"--slices {slices} is for TPU topologies; a GPU target names its hosts: "
            f"MODEL:HOSTSxGPUS, e.g. h100:{slices}x8"
        )
    _, hosts, _ = gpu_targets.parse_gpu_target(target)
    devices = gpu_targets.gpu_devices(target)
    if hosts > 1 and cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp == 1:
        data, fsdp, *_ = resolve_mesh_shape(cfg.mesh, len(devices))
        axis = "dcn_data" if data % hosts == 0 else "dcn_fsdp" if fsdp % hosts == 0 else None
        if axis is not None:
            mesh_cfg = dataclasses.replace(cfg.mesh, **{axis: hosts})
            cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    return cfg, devices


def _compiled_sizes(sizes: dict[str, int]) -> dict[str, int]:
    return {
        "arguments_bytes": sizes["argument"],
        "outputs_bytes": sizes["output"],
        "aliased_bytes": sizes["alias"],
        "generated_code_bytes": sizes["generated_code"],
        # Activations a remat policy offloads (model.remat: offload_*) live in host memory.
        "host_temp_bytes": sizes["host_temp"],
    }


def _gpu_fields(cfg: Config, compiled, mesh, sizes: dict[str, int], target: str):
    """The GPU compile's own fields of the report (see :func:`plan`)."""
    _, hosts, per_host = gpu_targets.parse_gpu_target(target)
    devices = list(mesh.devices.flat)
    hbm = gpu_targets.gpu_spec(target).memory_bytes
    peak = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]  # see plan()
    impl = cfg.model.attention_impl
    return {
        "compiler": "gpu",
        "target": target,
        "hosts": hosts,
        "gpus_per_host": per_host,
        "dcn": {"data": cfg.mesh.dcn_data, "fsdp": cfg.mesh.dcn_fsdp},  # the hosts' axis
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "hbm_bytes": hbm,
        "fits": peak <= hbm,
        "attention_impl": auto_attention("gpu") if impl == "auto" else impl,
        **gpu_targets.kernel_counts(compiled.as_text()),
        **_compiled_sizes(sizes),
    }


def _tpu_fields(cfg: Config, compiled, mesh, sizes: dict[str, int], target: str, slices: int):
    """The TPU compile's own fields of the report (see :func:`plan`)."""
    devices = list(mesh.devices.flat)
    kind = devices[0].device_kind
    hbm = chip_hbm_bytes(kind)
    per_chip = devices_per_chip(devices)
    peak = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]  # see plan()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
    seconds = float((cost or {}).get("optimal_seconds", -1.0))
    impl = cfg.model.attention_impl
    return {
        "compiler": "tpu",
        "target": target,
        "slices": slices,
        "device_kind": kind,
        "devices": len(devices),
        "devices_per_chip": per_chip,
        "hbm_bytes": hbm,
        "fits": None if hbm is None else peak <= hbm // per_chip,
        "step_time_estimate_s": seconds if seconds > 0 else None,
        "estimate_leaves_out": ESTIMATE_LEAVES_OUT,
        "attention_impl": auto_attention("tpu") if impl == "auto" else impl,
        "mosaic_kernels": compiled.as_text().count('custom_call_target="tpu_custom_call"'),
        **_compiled_sizes(sizes),
    }


def _gib(n: int) -> str:
    return f"{n / GIB:9.3f} GiB" if n >= GIB // 10 else f"{n / 2**20:9.3f} MiB"


def _format_does_not_fit(report: dict[str, Any]) -> str:
    """The text of a plan the compiler refused for memory (see :func:`_does_not_fit`)."""
    asked, total = report["activations_bytes"], report["bytes_per_device"]
    return "\n".join([
        f"{report['compiler'].upper()} {report['target']} ({report['device_kind']}), "
        f"mesh {report['mesh']}, {report['n_params']:,} parameters: does NOT fit",
        f"  parameters          {_gib(report['params_bytes'])} per device",
        f"  optimizer state     {_gib(report['opt_state_bytes'])} per device",
        f"  batch               {_gib(report['batch_bytes'])} per device",
        f"  temporaries asked   {_gib(asked) if asked is not None else '    unknown'} per device",
        f"  total               {_gib(total) if total is not None else '    unknown'} per device",
        f"  compiler            {report['compiler_message']}",
    ])  # fmt: skip


def format_plan(report: dict[str, Any]) -> str:
    if "compiler_message" in report:
        return _format_does_not_fit(report)
    gib = _gib

    lines = [
        f"mesh {report['mesh']} on {report['devices']} devices, {report['n_params']:,} parameters",
        f"  parameters          {gib(report['params_bytes'])} per device",
        f"  optimizer state     {gib(report['opt_state_bytes'])} per device",
        f"  batch               {gib(report['batch_bytes'])} per device",
        f"  activations + temps {gib(report['activations_bytes'])} per device",
        f"  total               {gib(report['bytes_per_device'])} per device",
        f"  compile             {report['compile_s']:.1f} s",
    ]
    if report.get("compiler") == "gpu":
        lines.insert(0, _gpu_headline(report))
        verdict = "fits" if report["fits"] else "does NOT fit"
        lines.append(f"  GPU memory          {gib(report['hbm_bytes'])} per device: {verdict}")
    if report.get("compiler") == "tpu":
        slices = f" x {report['slices']} slices" if report["slices"] > 1 else ""
        kernels = f"{report['attention_impl']} ({report['mosaic_kernels']} Mosaic kernel calls)"
        lines.insert(
            0, f"TPU {report['target']}{slices} ({report['device_kind']}), attention {kernels}"
        )
        if report["hbm_bytes"] is not None:
            share = report["hbm_bytes"] // report["devices_per_chip"]
            verdict = "fits" if report["fits"] else "does NOT fit"
            lines.append(f"  HBM                 {gib(share)} per device: {verdict}")
        estimate = report["step_time_estimate_s"]
        lines.append(
            f"  XLA step estimate   {estimate:9.3g} s (leaves out custom kernels; loops once)"
            if estimate is not None
            else "  XLA step estimate        none (XLA gave none for this program)"
        )
    lines += format_plan_mfu(report)
    return "\n".join(lines)


def _gpu_headline(report: dict[str, Any]) -> str:
    kernels = (
        f"{report['cudnn_attention_kernels']} cuDNN attention calls, "
        f"{report['triton_kernels']} Triton kernels"
    )
    split = [axis for axis, n in report["dcn"].items() if n > 1]
    hosts = f"; the hosts split {split[0]}" if split else ""
    return (
        f"GPU {report['target']} ({report['hosts']} x {report['gpus_per_host']} "
        f"{report['device_kind']}{hosts}), attention {report['attention_impl']} ({kernels})"
    )
