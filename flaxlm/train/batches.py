"""Moving host batches onto the mesh, and evaluation over a split."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from flaxlm.config import ConfigError
from flaxlm.parallel.sharding import BATCH_AXES, batch_sharding, micro_batch_sharding


def rows_per_shard(mesh: Mesh) -> int:
    """How many ways the batch dimension is split: the product of the (data, fsdp) axes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_fits(
    global_batch: int, grad_accum: int, mesh: Mesh, key: str = "train.batch_size"
) -> None:
    """Raises ConfigError unless ``global_batch`` splits into ``grad_accum`` micro-batches
    that split over the mesh's batch shards, and over the processes; ``key`` names the
    value in the message (a ``train.batch_ramp`` entry, say)."""
    micro = global_batch // grad_accum
    shards = rows_per_shard(mesh)
    if micro % shards:
        raise ConfigError(
            f"micro-batch {key}/train.grad_accum={micro} is not divisible by the "
            f"{shards} batch shards of mesh data x fsdp = {dict(mesh.shape)}"
        )
    if global_batch % jax.process_count():
        raise ConfigError(
            f"{key}={global_batch} is not divisible by {jax.process_count()} processes"
        )


def check_train_batches_fit(train_cfg: Any, mesh: Mesh) -> None:
    """:func:`check_batch_fits` for ``train.batch_size`` and each ``train.batch_ramp`` size
    (one compiled train step each), the error naming the entry."""
    check_batch_fits(train_cfg.batch_size, train_cfg.grad_accum, mesh)
    for i, (start, size) in enumerate(train_cfg.batch_ramp):
        key = f"train.batch_ramp[{i}]=[{start}, {size}]: batch size"
        check_batch_fits(size, train_cfg.grad_accum, mesh, key)


def put_train_batch(local: dict[str, np.ndarray], mesh: Mesh, grad_accum: int) -> dict:
    """This process's rows ``(b_local, X)`` -> global ``(A, B / A, X)`` arrays on the mesh.

    Each process splits its own rows into ``A`` micro-batches; global micro-batch ``a`` is the
    concatenation of every process's micro-batch ``a``.
    """
    sharding = micro_batch_sharding(mesh)
    out = {}
    for key, rows in local.items():
        b_local, width = rows.shape
        micro = rows.reshape(grad_accum, b_local // grad_accum, width)
        global_shape = (grad_accum, b_local * jax.process_count() // grad_accum, width)
        out[key] = jax.make_array_from_process_local_data(sharding, micro, global_shape)
    return out


def put_eval_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict:
    """This process's rows ``(b_local, X)`` -> global ``(B, X)`` arrays on the mesh."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, rows in local.items():
        global_shape = (rows.shape[0] * jax.process_count(), rows.shape[1])
        out[key] = jax.make_array_from_process_local_data(sharding, rows, global_shape)
    return out


def evaluate_batches(
    eval_step: Callable, params, local_batches: Iterable[dict], mesh: Mesh, family, cfg
) -> dict[str, Any]:
    """The family's eval report (``val_loss`` first) over an iterable of this process's rows.

    Every process passes its own rows of the same global batches (``eval_batches`` with the
    process index); padding rows carry zero weights and do not count. The summed metrics are
    added up on the host in float64 and read once, after the whole pass.
    """
    pending = [eval_step(params, put_eval_batch(batch, mesh)) for batch in local_batches]
    totals = None
    for metrics in jax.device_get(pending):  # one sync for the whole pass
        metrics = jax.tree.map(lambda x: np.asarray(x, np.float64), metrics)
        totals = metrics if totals is None else jax.tree.map(np.add, totals, metrics)
    if totals is None:
        raise ValueError("evaluation got no batches: the split is empty")
    return family.eval_report(cfg, totals)
