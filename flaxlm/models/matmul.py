"""The one matmul every projection and the tied LM head go through: ``x @ w`` accumulated and
returned in float32, with a hand-written backward pass.

Why not autodiff of ``jax.lax.dot_general``:
- fp32: XLA's CPU backward materialises transposed copies of the big gradients (the
  ``B*S x F`` MLP and ``B*S x V`` logit gradients) and runs some weight gradients outside
  the fast matmul library; the explicit products below avoid both (benchmarks/RESULTS.md,
  "CPU matmul precision").
- bf16: the cotangent is f32, so autodiff runs both backward products as f32 x f32, half the
  speed of bf16 x bf16 -> f32 on our CPUs (same section); here it is cast to the inputs' dtype
  first, and the products accumulate in float32 again.
Both were measured on CPU only: ``custom_backward`` (``model.custom_backward``,
flaxlm/models/backward.py) picks this backward or plain autodiff of the same product.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flaxlm.models import backward

Array = jax.Array


def matmul(
    x_NxI: Array, w: Array, rhs_transposed: bool = False, custom_backward: bool | None = None
) -> Array:
    """``x @ w`` (``x @ w.T`` if ``rhs_transposed``) of same-dtype inputs, accumulated and
    returned in float32; the gradients come back in the inputs' dtypes. 3-D operands
    ``(G, N, I)``, ``(G, I, F)`` are G independent products. ``custom_backward``: the
    hand-written backward (True) or autodiff (False); None = the ``auto`` choice."""
    if backward.resolve(custom_backward):
        return _matmul(x_NxI, w, rhs_transposed)
    return _product(x_NxI, w, rhs_transposed)


def _product(x_NxI: Array, w: Array, rhs_transposed: bool) -> Array:
    return _dot(x_NxI, w, (x_NxI.ndim - 1, w.ndim - (1 if rhs_transposed else 2)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_NxI: Array, w: Array, rhs_transposed: bool) -> Array:
    return _product(x_NxI, w, rhs_transposed)


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    batch = ((0,), (0,)) if a.ndim == 3 else ((), ())
    dims = (((contract[0],), (contract[1],)), batch)
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _matmul_fwd(x_NxI, w, rhs_transposed):
    return _product(x_NxI, w, rhs_transposed), (x_NxI, w)


def _matmul_bwd(rhs_transposed, residuals, g_NxF):
    x_NxI, w = residuals
    g_NxF = g_NxF.astype(x_NxI.dtype)
    n, f = x_NxI.ndim - 2, g_NxF.ndim - 1  # the N and F axes of x and g
    if rhs_transposed:  # w is ([G,] F, I)
        dx, dw = _dot(g_NxF, w, (f, w.ndim - 2)), _dot(g_NxF, x_NxI, (n, n))
    else:  # w is ([G,] I, F)
        dx, dw = _dot(g_NxF, w, (f, w.ndim - 1)), _dot(x_NxI, g_NxF, (n, n))
    return dx.astype(x_NxI.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
