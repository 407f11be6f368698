"""bf16 products that stay bf16 in the backward pass too, accumulated in float32.

Plain autodiff of a ``bf16 x bf16 -> f32`` matmul runs both backward products as f32 x f32
(the cotangent is f32), which on our CPUs is half the speed of bf16 x bf16 -> f32
(PLATFORM.md). These custom-gradient versions cast the cotangent to the inputs' dtype and
accumulate in float32 again. Used by flaxlm/models/layers.py when ``model.dtype: bfloat16``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def low_precision_matmul(x_NxI: Array, w: Array, rhs_transposed: bool = False) -> Array:
    """``x @ w`` (``x @ w.T`` if ``rhs_transposed``) of bf16 inputs, accumulated and returned in
    float32 — and so are both backward products, with the cotangent cast to the inputs' dtype.
    Plain autodiff would run the backward matmuls as f32 x f32 (the cotangent is f32), which
    on our CPUs is half the speed of bf16 x bf16 -> f32 (PLATFORM.md). 3-D operands
    ``(G, N, I)``, ``(G, I, F)`` are G independent products (attention)."""
    return _dot(x_NxI, w, (x_NxI.ndim - 1, w.ndim - (1 if rhs_transposed else 2)))


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    batch = ((0,), (0,)) if a.ndim == 3 else ((), ())
    dims = (((contract[0],), (contract[1],)), batch)
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _low_precision_fwd(x_NxI, w, rhs_transposed):
    return low_precision_matmul(x_NxI, w, rhs_transposed), (x_NxI, w)


def _low_precision_bwd(rhs_transposed, residuals, g_NxF):
    x_NxI, w = residuals
    g_NxF = g_NxF.astype(x_NxI.dtype)
    n, f = x_NxI.ndim - 2, g_NxF.ndim - 1  # the N and F axes of x and g
    if rhs_transposed:  # w is ([G,] F, I)
        dx, dw = _dot(g_NxF, w, (f, w.ndim - 2)), _dot(g_NxF, x_NxI, (n, n))
    else:  # w is ([G,] I, F)
        dx, dw = _dot(g_NxF, w, (f, w.ndim - 1)), _dot(x_NxI, g_NxF, (n, n))
    return dx.astype(x_NxI.dtype), dw.astype(w.dtype)


low_precision_matmul.defvjp(_low_precision_fwd, _low_precision_bwd)


def low_precision_attention(q_BxLxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array,
                            mask_Bx1xLxS: Array) -> Array:  # fmt: skip
    """Softmax attention with bf16 products accumulated in f32 (forward and backward, see
    :func:`low_precision_matmul`) and the softmax in f32; ``out_BxLxHxK`` in the inputs' dtype.
    """
    (b, length, h, k), s = q_BxLxHxK.shape, k_BxSxHxK.shape[1]

    def heads_first(x_BxTxHxK: Array) -> Array:
        return x_BxTxHxK.transpose(0, 2, 1, 3).reshape(b * h, -1, k)

    q_GxLxK = heads_first(q_BxLxHxK * jnp.asarray(k**-0.5, q_BxLxHxK.dtype))
    scores_GxLxS = low_precision_matmul(q_GxLxK, heads_first(k_BxSxHxK), True)
    mask_GxLxS = jnp.broadcast_to(mask_Bx1xLxS, (b, h, length, s)).reshape(b * h, length, s)
    scores_GxLxS = jnp.where(mask_GxLxS, scores_GxLxS, jnp.finfo(jnp.float32).min)
    probs_GxLxS = jax.nn.softmax(scores_GxLxS, axis=-1).astype(q_BxLxHxK.dtype)
    out_GxLxK = low_precision_matmul(probs_GxLxS, heads_first(v_BxSxHxK))
    out_BxHxLxK = out_GxLxK.astype(q_BxLxHxK.dtype).reshape(b, h, length, k)
    return out_BxHxLxK.transpose(0, 2, 1, 3)
