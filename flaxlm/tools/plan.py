"""``flaxlm plan``: how much memory one device needs for a config's train step, before
renting the hardware.

The train step is lowered and compiled ahead of time on *abstract* inputs (shapes and
shardings only: nothing is allocated; the batch has the model family's keys and shapes) over
the configured mesh; simulated CPU devices stand in for the real ones. Parameters and
optimizer state are counted from their shardings; activations and temporaries come from XLA's
memory analysis of the compiled program.

    flaxlm plan configs/gpt_7b.yaml --devices 64 --json
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import numpy as np

from flaxlm.config import Config
from flaxlm.families import family_of
from flaxlm.models import count_params
from flaxlm.sharding import micro_batch_sharding, replicated
from flaxlm.train.model_state import ModelState
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


def plan(cfg: Config) -> dict[str, Any]:
    """Compiles the train step for ``cfg`` on abstract inputs; returns per-device bytes.

    Keys: ``bytes_per_device`` (the total), ``params_bytes``, ``opt_state_bytes``,
    ``activations_bytes`` (XLA temporaries: activations, gradients, workspace),
    ``compile_s``, ``n_params``, ``mesh``, ``devices``.
    """
    family = family_of(cfg)
    ms = ModelState.build(cfg, family)
    abstract, state_sh = ms.abstract, ms.shardings
    state_in = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
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
    t0 = time.perf_counter()
    compiled = ms.train_step.lower(state_in, batch, controls).compile()
    compile_s = time.perf_counter() - t0

    params_bytes = _bytes_per_device(abstract.params, state_sh.params)
    opt_bytes = _bytes_per_device(abstract.opt_state, state_sh.opt_state)
    memory = compiled.memory_analysis()
    temp = int(getattr(memory, "temp_size_in_bytes", 0)) if memory is not None else 0
    arguments = int(getattr(memory, "argument_size_in_bytes", 0)) if memory is not None else 0
    state_and_batch = max(arguments, params_bytes + opt_bytes)
    return {
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


def format_plan(report: dict[str, Any]) -> str:
    def gib(n: int) -> str:
        return f"{n / GIB:9.3f} GiB" if n >= GIB // 10 else f"{n / 2**20:9.3f} MiB"

    lines = [
        f"mesh {report['mesh']} on {report['devices']} devices, {report['n_params']:,} parameters",
        f"  parameters          {gib(report['params_bytes'])} per device",
        f"  optimizer state     {gib(report['opt_state_bytes'])} per device",
        f"  batch               {gib(report['batch_bytes'])} per device",
        f"  activations + temps {gib(report['activations_bytes'])} per device",
        f"  total               {gib(report['bytes_per_device'])} per device",
        f"  compile             {report['compile_s']:.1f} s",
    ]
    return "\n".join(lines)
