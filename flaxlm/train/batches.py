"""Moving host batches onto the mesh, and evaluation over a split."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxlm.config import ConfigError
from flaxlm.sharding import BATCH_AXES


def rows_per_shard(mesh: Mesh) -> int:
    """How many ways the batch dimension is split: the product of the (data, fsdp) axes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_fits(global_batch: int, grad_accum: int, mesh: Mesh) -> None:
    micro = global_batch // grad_accum
    shards = rows_per_shard(mesh)
    if micro % shards:
        raise ConfigError(
            f"micro-batch train.batch_size/train.grad_accum={micro} is not divisible by the "
            f"{shards} batch shards of mesh data x fsdp = {dict(mesh.shape)}"
        )
    if global_batch % jax.process_count():
        raise ConfigError(
            f"train.batch_size={global_batch} is not divisible by {jax.process_count()} processes"
        )


def put_train_batch(local: dict[str, np.ndarray], mesh: Mesh, grad_accum: int) -> dict:
    """This process's rows ``(b_local, L)`` -> global ``(A, B / A, L)`` arrays on the mesh.

    Each process splits its own rows into ``A`` micro-batches; global micro-batch ``a`` is the
    concatenation of every process's micro-batch ``a``.
    """
    sharding = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))
    out = {}
    for key, rows in local.items():
        b_local, length = rows.shape
        micro = rows.reshape(grad_accum, b_local // grad_accum, length)
        global_shape = (grad_accum, b_local * jax.process_count() // grad_accum, length)
        out[key] = jax.make_array_from_process_local_data(sharding, micro, global_shape)
    return out


def put_eval_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict:
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))
    out = {}
    for key, rows in local.items():
        global_shape = (rows.shape[0] * jax.process_count(), rows.shape[1])
        out[key] = jax.make_array_from_process_local_data(sharding, rows, global_shape)
    return out


def evaluate_batches(eval_step: Callable, params, local_batches, mesh: Mesh) -> dict[str, float]:
    """Mean loss, perplexity and accuracy over an iterable of this process's ``(b, L)`` rows.

    Every process passes its own rows of the same global batches (``eval_batches`` with the
    process index); padding rows carry ``loss_mask`` 0 and do not count.
    """
    totals = {"ce_sum": 0.0, "correct": 0.0, "n_tokens": 0.0}
    pending = [eval_step(params, put_eval_batch(batch, mesh)) for batch in local_batches]
    for metrics in jax.device_get(pending):  # one sync for the whole pass
        for key in totals:
            totals[key] += float(metrics[key])
    n = max(totals["n_tokens"], 1.0)
    loss = totals["ce_sum"] / n
    return {
        "val_loss": loss,
        "perplexity": float(np.exp(min(loss, 50.0))),
        "accuracy": totals["correct"] / n,
        "tokens": int(totals["n_tokens"]),
    }
