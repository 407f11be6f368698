"""The LM head and its cross-entropy in one pass over sequence chunks (``train.head_chunk``).

The plain path writes the full ``B x L x V`` float32 logits, reads them back for the loss,
writes their gradient and reads that twice more for the two backward matmuls. Here the
positions are taken ``chunk`` at a time: each chunk's logits are made, reduced to the loss,
turned into their gradient (closed form, below) and multiplied back into the gradients of
the hidden states and the head weight while they are still in cache, so the full logits are
never stored. With a 50k vocabulary that is the largest activation of a GPT step; on the
CPU it saves memory at a large vocabulary but not time (benchmarks/RESULTS.md, "Chunked LM
head"), so it is off by default.

The gradient of the per-token objective (label smoothing eps, z-loss z, softmax p):

    d objective / d logits = p * (1 + 2 z lse) - (1 - eps) * onehot(target) - eps / V

It is computed in the forward pass (the loss is a weighted sum, so the incoming cotangent is
one scalar that scales both gradients); called without differentiation, only the loss runs.
With ``custom_backward`` off (``model.custom_backward``, flaxlm/models/backward.py) autodiff
takes the gradient instead, each chunk rematerialised so that the logits are still never
stored whole.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxlm.losses.objectives import token_losses
from flaxlm.models import backward

Array = jax.Array


def chunk_size(length: int, requested: int) -> int:
    """The largest divisor of ``length`` that is <= ``requested`` (>= 1)."""
    requested = max(1, min(requested, length))
    return max(d for d in range(1, requested + 1) if length % d == 0)


def fused_lm_loss(
    hidden_BxLxD: Array,
    head: Array,
    targets_BxL: Array,
    weights_BxL: Array,
    *,
    head_is_embedding: bool,
    chunk: int,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    custom_backward: bool | None = None,
) -> tuple[Array, Array, Array]:
    """``(objective_sum, ce_BxL, correct_BxL)`` of the LM head on ``hidden_BxLxD``.

    ``head``: the tied embedding ``(V, D)`` (``head_is_embedding``) or an untied kernel
    ``(D, V)``. Products take the hidden states' dtype and accumulate in float32, like
    :func:`flaxlm.models.matmul.matmul`. ``objective_sum`` is the trained sum (weighted by
    ``weights_BxL``, with label smoothing and z-loss) and is differentiable in ``hidden`` and
    ``head``; ``ce_BxL`` (plain cross-entropy) and ``correct_BxL`` (the target holds the largest
    logit) are metrics and carry no gradient. ``custom_backward``: the closed-form gradient
    (True) or autodiff (False); None = the ``auto`` choice
    (:func:`flaxlm.models.backward.use_custom_backward`).
    """
    length = hidden_BxLxD.shape[1]
    options = (head_is_embedding, chunk_size(length, chunk), float(label_smoothing), float(z_loss))
    weights_BxL = weights_BxL.astype(jnp.float32)
    if backward.resolve(custom_backward):
        return _fused(hidden_BxLxD, head, targets_BxL, weights_BxL, options)
    objective, (ce_BxL, correct_BxL) = _run(
        hidden_BxLxD, head, targets_BxL, jax.lax.stop_gradient(weights_BxL), options,
        with_grads=False, remat=True,
    )  # fmt: skip
    return objective, jax.lax.stop_gradient(ce_BxL), jax.lax.stop_gradient(correct_BxL)


def _chunks(x_BxL: Array, chunk: int) -> Array:
    """``(B, L, ...)`` -> ``(L / chunk, B, chunk, ...)``: what the scan walks over."""
    b, length = x_BxL.shape[:2]
    x = x_BxL.reshape(b, length // chunk, chunk, *x_BxL.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unchunk(x_NxBxC: Array) -> Array:
    x = jnp.moveaxis(x_NxBxC, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _run(hidden_BxLxD, head, targets_BxL, weights_BxL, options, with_grads: bool, remat=False):
    """The scan over chunks; ``with_grads`` adds the closed-form gradients, ``remat`` makes
    autodiff recompute each chunk's logits instead of storing them."""
    head_is_embedding, chunk, eps, z = options
    dtype = hidden_BxLxD.dtype
    vocab = head.shape[0] if head_is_embedding else head.shape[1]
    head_spec = "vd" if head_is_embedding else "dv"
    names = ("vocab", "embed") if head_is_embedding else ("embed", "vocab")

    def body(d_head, xs):
        h_BxCxD, t_BxC, w_BxC = xs
        # Sharded as the parameter inside each chunk (under a mesh): the table is gathered in
        # the compute dtype per chunk, and autodiff's gradient accumulator stays sharded too,
        # instead of a whole fp32 V x D table per device (benchmarks/RESULTS.md, "Chunked LM head").
        head_c = nn.with_logical_constraint(head, names).astype(dtype)
        logits = jnp.einsum(f"bcd,{head_spec}->bcv", h_BxCxD, head_c,
                            preferred_element_type=jnp.float32)  # fmt: skip
        ce_BxC, objective_BxC, correct_BxC = token_losses(logits, t_BxC, eps, z)
        out = (jnp.sum(objective_BxC * w_BxC), ce_BxC, correct_BxC)
        if not with_grads:
            return d_head, out
        lse_BxC = jax.nn.logsumexp(logits, axis=-1)  # XLA shares it with token_losses'
        probs_BxCxV = jnp.exp(logits - lse_BxC[..., None])
        g = probs_BxCxV * (1.0 + 2.0 * z * lse_BxC[..., None]) if z else probs_BxCxV
        g = g - (1.0 - eps) * jax.nn.one_hot(t_BxC, vocab, dtype=jnp.float32)
        if eps:
            g = g - eps / vocab
        g_BxCxV = (g * w_BxC[..., None]).astype(dtype)
        dh_BxCxD = jnp.einsum(f"bcv,{head_spec}->bcd", g_BxCxV, head_c,
                              preferred_element_type=jnp.float32)  # fmt: skip
        grad_spec = "bcv,bcd->vd" if head_is_embedding else "bcv,bcd->dv"
        d_head = d_head + jnp.einsum(grad_spec, g_BxCxV, h_BxCxD,
                                     preferred_element_type=jnp.float32)  # fmt: skip
        return d_head, (*out, dh_BxCxD.astype(dtype))

    xs = (_chunks(hidden_BxLxD, chunk), _chunks(targets_BxL, chunk), _chunks(weights_BxL, chunk))
    if remat:
        body = jax.checkpoint(body)
    d_head, outs = jax.lax.scan(body, jnp.zeros(head.shape, jnp.float32), xs)
    objective = jnp.sum(outs[0])
    metrics = (_unchunk(outs[1]), _unchunk(outs[2]))
    if not with_grads:
        return objective, metrics
    return objective, metrics, (_unchunk(outs[3]), d_head.astype(head.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(hidden_BxLxD, head, targets_BxL, weights_BxL, options):
    objective, (ce_BxL, correct_BxL) = _run(
        hidden_BxLxD, head, targets_BxL, weights_BxL, options, with_grads=False
    )
    return objective, ce_BxL, correct_BxL


def _fused_fwd(hidden_BxLxD, head, targets_BxL, weights_BxL, options):
    objective, (ce_BxL, correct_BxL), grads = _run(
        hidden_BxLxD, head, targets_BxL, weights_BxL, options, with_grads=True
    )
    return (objective, ce_BxL, correct_BxL), (grads, targets_BxL, weights_BxL)


def _fused_bwd(options, residuals, cotangents):
    (d_hidden, d_head), targets_BxL, weights_BxL = residuals
    ct_objective = cotangents[0]  # the metrics' cotangents are ignored: they carry no gradient
    return (
        (ct_objective * d_hidden).astype(d_hidden.dtype),
        (ct_objective * d_head).astype(d_head.dtype),
        np.zeros(targets_BxL.shape, jax.dtypes.float0),
        jnp.zeros_like(weights_BxL),
    )


_fused.defvjp(_fused_fwd, _fused_bwd)
