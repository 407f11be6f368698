"""LayerNorm and the MLP activations, with closed-form backward passes.

Autodiff of LayerNorm and of the tanh GELU keeps several intermediates per element (the
centred input, the tanh) and spends one memory pass on each, in the forward and again in the
backward; on CPU these element-wise passes cost as much as a matmul of the same block
(benchmarks/RESULTS.md). The versions here save the least the backward needs (the normalised
input and one scale per row; the GELU input) and compute each gradient in one pass.
Both run in float32. ``custom_backward`` (``model.custom_backward``, flaxlm/models/backward.py)
picks them or plain autodiff of the same formulas (``_layer_norm_plain``, ``_gelu_tanh_plain``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxlm.models import backward

Array = jax.Array

_GELU_C = math.sqrt(2.0 / math.pi)


# --- LayerNorm ------------------------------------------------------------------------------


def layer_norm(
    x_NxD: Array,
    scale_D: Array,
    bias_D: Array,
    eps: float,
    custom_backward: bool | None = None,
) -> Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, in float32 (the
    input's gradient comes back in its dtype). ``custom_backward``: the closed-form backward
    (True) or autodiff (False); None = the ``auto`` choice."""
    if backward.resolve(custom_backward):
        return _layer_norm(x_NxD, scale_D, bias_D, eps, jnp.dtype(x_NxD.dtype))
    return _layer_norm_plain(x_NxD, scale_D, bias_D, eps)


def _normalise(x_NxD: Array, eps: float) -> tuple[Array, Array]:
    """``(normed_NxD, inv_std_Nx1)`` in float32."""
    x_NxD = x_NxD.astype(jnp.float32)
    centred_NxD = x_NxD - jnp.mean(x_NxD, axis=-1, keepdims=True)
    inv_std_Nx1 = jax.lax.rsqrt(jnp.mean(jnp.square(centred_NxD), axis=-1, keepdims=True) + eps)
    return centred_NxD * inv_std_Nx1, inv_std_Nx1


def _layer_norm_plain(x_NxD: Array, scale_D: Array, bias_D: Array, eps: float) -> Array:
    normed_NxD, _ = _normalise(x_NxD, eps)
    return normed_NxD * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x_NxD: Array, scale_D: Array, bias_D: Array, eps: float, x_dtype) -> Array:
    return _layer_norm_fwd(x_NxD, scale_D, bias_D, eps, x_dtype)[0]


def _layer_norm_fwd(x_NxD, scale_D, bias_D, eps, x_dtype):
    normed_NxD, inv_std_Nx1 = _normalise(x_NxD, eps)
    y_NxD = normed_NxD * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)
    return y_NxD, (normed_NxD, inv_std_Nx1, scale_D, bias_D)


def _layer_norm_bwd(eps, x_dtype, residuals, g_NxD):
    normed_NxD, inv_std_Nx1, scale_D, bias_D = residuals
    g_NxD = g_NxD.astype(jnp.float32)
    rows = tuple(range(g_NxD.ndim - 1))
    d_scale = jnp.sum(g_NxD * normed_NxD, axis=rows)
    d_bias = jnp.sum(g_NxD, axis=rows)
    g_normed_NxD = g_NxD * scale_D.astype(jnp.float32)
    mean_g = jnp.mean(g_normed_NxD, axis=-1, keepdims=True)
    mean_gn = jnp.mean(g_normed_NxD * normed_NxD, axis=-1, keepdims=True)
    dx_NxD = inv_std_Nx1 * (g_normed_NxD - mean_g - normed_NxD * mean_gn)
    return dx_NxD.astype(x_dtype), d_scale.astype(scale_D.dtype), d_bias.astype(bias_D.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """LayerNorm with ``scale`` / ``bias`` parameters named like ``nn.LayerNorm``'s (so
    checkpoints and the HF converters see the same tree); output float32. Without
    ``use_bias`` the bias is a constant zero, not a parameter."""

    epsilon: float = 1e-5
    use_bias: bool = True
    param_dtype: jnp.dtype = jnp.float32
    scale_init: nn.initializers.Initializer = nn.initializers.ones_init()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    custom_backward: bool | None = None  # see layer_norm

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, features, self.param_dtype)
        else:
            bias = jnp.zeros(features, jnp.float32)
        return layer_norm(x, scale, bias, self.epsilon, self.custom_backward)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich; Llama): ``x / sqrt(mean(x^2) + eps) * scale`` over the last
    axis, in float32; no mean subtraction, no bias. Its one parameter is ``scale``, as
    LayerNorm's. Plain autodiff (no hand-written backward)."""

    epsilon: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32
    scale_init: nn.initializers.Initializer = nn.initializers.ones_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", self.scale_init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return x32 * inv_rms * scale.astype(jnp.float32)


# --- activations ----------------------------------------------------------------------------


def gelu_tanh(x: Array, custom_backward: bool | None = None) -> Array:
    """GELU, tanh approximation (GPT-2, BERT's TF code), in float32. ``custom_backward``: the
    closed-form backward (True) or autodiff (False); None = the ``auto`` choice."""
    if backward.resolve(custom_backward):
        return _gelu_tanh(x)
    return _gelu_tanh_plain(x)


def _gelu_tanh_plain(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return 0.5 * x * (1.0 + jnp.tanh(_GELU_C * (x + 0.044715 * x**3)))


@jax.custom_vjp
def _gelu_tanh(x: Array) -> Array:
    return _gelu_tanh_plain(x)


def _gelu_tanh_fwd(x):
    return _gelu_tanh_plain(x), x


def _gelu_tanh_bwd(x, g):
    # The barrier keeps XLA from sharing this tanh with the forward's (CSE), which would
    # store it as a second B x L x F array instead of recomputing it in this one pass.
    x32 = jax.lax.optimization_barrier(x).astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (x32 + 0.044715 * x32**3))
    slope = 0.5 * (1.0 + t) + 0.5 * x32 * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x32**2)
    return ((g * slope).astype(x.dtype),)


_gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def swiglu(gate: Array, up: Array) -> Array:
    """``silu(gate) * up`` computed in float32, returned in ``up``'s dtype. Its backward reads
    the saved inputs and the incoming gradient in their own dtype and writes both gradients in
    one pass, so a bf16 layer never holds a float32 tokens x d_ff buffer (autodiff of the
    float32 formula makes XLA:TPU keep one: in the MoE layer, rows x d_expert, its largest).
    Unlike the CPU-speed backward passes above this one is on everywhere (it is about memory,
    not ``model.custom_backward``); in float32 it is the same function."""
    return _swiglu(gate, up)


def _swiglu_plain(gate: Array, up: Array) -> Array:
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(up.dtype)


@jax.custom_vjp
def _swiglu(gate: Array, up: Array) -> Array:
    return _swiglu_plain(gate, up)


def _swiglu_fwd(gate, up):
    return _swiglu_plain(gate, up), (gate, up)


def _swiglu_bwd(residuals, g):
    gate, up = residuals
    g32, gate32, up32 = (a.astype(jnp.float32) for a in (g, gate, up))
    sig = jax.nn.sigmoid(gate32)
    d_up = g32 * gate32 * sig
    d_gate = g32 * up32 * sig * (1.0 + gate32 * (1.0 - sig))
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def activation_fn(name: str, custom_backward: bool | None = None) -> Callable[[Array], Array]:
    """``gelu`` (tanh approximation, as GPT-2), ``gelu_exact``, ``relu``; the GELUs compute in
    float32 whatever the input's dtype (a bf16 input is read, not stored, in float32).
    ``custom_backward`` applies to ``gelu`` (the others are autodiff always); None = the
    ``auto`` choice."""
    fns = {
        "gelu": functools.partial(gelu_tanh, custom_backward=custom_backward),
        "gelu_exact": lambda x: jax.nn.gelu(x.astype(jnp.float32), approximate=False),
        "relu": jax.nn.relu,
    }
    if name not in fns:
        raise ValueError(f"activation {name!r} is not one of {', '.join(fns)}")
    return fns[name]
