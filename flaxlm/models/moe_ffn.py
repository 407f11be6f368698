"""The experts' FFN on rows sorted by expert (flaxlm/models/moe.py, moe_dispatch.py): grouped
matmuls (``jax.lax.ragged_dot``, a Mosaic kernel on TPU), run in row chunks when the buffer
is large.

Under expert parallelism a device's receive buffer is sized for the worst case (every pair of
every peer lands on it: 32,768 rows for Mixtral on ``v5p:4x4x4``), so one rows x d_expert
activation is 0.94 GB in bf16 and the backward holds several (up, gate, their gradients, the
SwiGLU output). Here the rows go through the FFN in chunks, a ``scan`` whose body is
rematerialised: the backward keeps one chunk's hidden activations at a time, never the whole
buffer's. Each row's arithmetic is the same as in one grouped matmul (the outputs and the
input gradients are those of the unchunked FFN); the weight gradients are summed over the
chunks in the weights' dtype. The chunk count is chosen from the buffer's size
(:data:`CHUNK_BYTES`); small buffers run unchunked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxlm.models.norm_act import activation_fn, swiglu

Array = jax.Array

# Largest rows x d_expert buffer (bytes) before the rows are chunked: at pod scale a few of
# these are what remains of the layer's backward, beside the rows x d_model buffers.
CHUNK_BYTES = 64 * 2**20


def grouped_ffn(x_RxD: Array, sizes_G: Array, up: Array, gate: Array | None, down: Array, *,
                activation: str, dtype, chunk_rows: int | None = None) -> Array:  # fmt: skip
    """``down(act(x up) [* (x gate)])`` per row, with the weights of the row's group.

    Args:
      x_RxD: rows sorted by group; rows past ``sum(sizes_G)`` belong to no group (output 0).
      sizes_G: rows per group (int32). up_GxDxF, gate_GxDxF (SwiGLU; None otherwise),
        down_GxFxD: the groups' weights.
      activation: the activation when ``gate`` is None. dtype: the matmuls' output dtype
        (accumulated in float32; the hidden activations and their gradients stay in it).
      chunk_rows: rows per chunk (must divide R); None = chosen from :data:`CHUNK_BYTES`.
    Returns y_RxD in ``dtype``.
    """
    rows, f = x_RxD.shape[0], up.shape[-1]
    if chunk_rows is None:
        chunk_rows = _chunk_rows(rows, f * jnp.dtype(dtype).itemsize)
    if chunk_rows <= 0 or rows % chunk_rows:
        raise ValueError(f"chunk_rows={chunk_rows} must be a positive divisor of the {rows} rows")

    def ffn(x_CxD, sizes):
        return _ffn(x_CxD, sizes, up, gate, down, activation=activation, dtype=dtype)

    if chunk_rows == rows:
        return ffn(x_RxD, sizes_G)
    ends_G = jnp.cumsum(sizes_G)
    starts_G = ends_G - sizes_G

    @jax.checkpoint  # the backward recomputes one chunk's hidden activations at a time
    def chunk(carry, xs):
        x_CxD, first = xs
        # the groups' rows that fall in [first, first + chunk_rows)
        sizes = jnp.clip(ends_G - first, 0, chunk_rows) - jnp.clip(starts_G - first, 0, chunk_rows)
        return carry, ffn(x_CxD, sizes.astype(sizes_G.dtype))

    n = rows // chunk_rows
    firsts = jnp.arange(n, dtype=sizes_G.dtype) * chunk_rows
    _, y_NxCxD = jax.lax.scan(chunk, None, (x_RxD.reshape(n, chunk_rows, -1), firsts))
    return y_NxCxD.reshape(rows, -1)


def _chunk_rows(rows: int, row_bytes: int) -> int:
    """The most rows (a divisor of ``rows``) whose hidden buffer fits :data:`CHUNK_BYTES`."""
    n = 1
    while rows * row_bytes > n * CHUNK_BYTES and rows % (2 * n) == 0:
        n *= 2
    return rows // n


def _ffn(x_RxD, sizes_G, up, gate, down, *, activation: str, dtype) -> Array:
    """One grouped FFN (accumulated in float32, returned in ``dtype``). The hidden
    activations, the outputs and so their gradients stay in ``dtype`` (float32 only inside the
    fused activation): a float32 output would make the backward's rows x d_expert gradient
    float32 too."""

    def mm(x, w):
        return jax.lax.ragged_dot(x, w, sizes_G, preferred_element_type=dtype)

    h = mm(x_RxD, up)
    if gate is not None:
        h = swiglu(mm(x_RxD, gate), h)
    else:
        h = activation_fn(activation)(h)
    return mm(h.astype(dtype), down)
