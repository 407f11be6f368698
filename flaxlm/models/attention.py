"""Softmax attention with a hand-written backward pass (the default, ``model.attention_impl:
flaxlm``), and the choice between it and ``jax.nn.dot_product_attention``.
``model.custom_backward`` (flaxlm/models/backward.py) picks that backward or plain autodiff
of the same forward.

Why not autodiff of ``jax.nn.dot_product_attention``: on CPU its XLA backward re-derives the
softmax through several B x H x L x S passes and layout copies; the closed form below needs
one (``dS = P * (dP - rowsum(dO * O))``, as in FlashAttention) and runs the fp32 step's
attention at 2.4x the speed (benchmarks/RESULTS.md). Products take the inputs' dtype and
accumulate in float32, forward and backward, so bf16 attention stays bf16 x bf16 -> f32 on
the way back too (see flaxlm/models/matmul.py); the softmax is float32.

Layout: heads first (``B, H, L, K``) inside, where each head's products are contiguous
batched matmuls; callers pass and get ``B, L, H, K``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.config import CHOICES
from flaxlm.models import backward
from flaxlm.models.platform import auto_attention

Array = jax.Array

IMPLEMENTATIONS = CHOICES["model.attention_impl"]


def attention(
    q_BxLxHxK: Array,
    k_BxSxHxK: Array,
    v_BxSxHxK: Array,
    mask_Bx1xLxS: Array,
    impl: str = "flaxlm",
    causal_block: int = 0,
    custom_backward: bool | None = None,
) -> Array:
    """Multi-head softmax attention, ``out_BxLxHxK`` in the inputs' dtype.

    ``impl``: ``flaxlm`` (:func:`softmax_attention`), ``xla`` or ``cudnn``
    (``jax.nn.dot_product_attention`` with that implementation; cuDNN needs a GPU and
    bf16 / fp16 inputs). ``causal_block`` > 0 promises that the mask hides every key after
    its query, ``custom_backward`` picks the backward of ``flaxlm`` (see
    :func:`softmax_attention`).
    """
    if impl == "auto":
        impl = auto_attention()
    if impl == "flaxlm":
        return softmax_attention(
            q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xLxS, causal_block, custom_backward
        )
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention_impl={impl!r} is not one of {', '.join(IMPLEMENTATIONS)}"
        )
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_Bx1xLxS, implementation=impl
    )


def softmax_attention(
    q_BxLxHxK: Array,
    k_BxSxHxK: Array,
    v_BxSxHxK: Array,
    mask_Bx1xLxS: Array,
    causal_block: int = 0,
    custom_backward: bool | None = None,
) -> Array:
    """``softmax(q k^T / sqrt(K) masked) v`` per head; masked keys get zero weight (a query
    with no visible key gets the uniform average, as ``jax.nn.dot_product_attention``).
    ``custom_backward``: the closed-form backward (True) or autodiff (False); None = the
    ``auto`` choice.

    ``causal_block`` > 0, for a mask that hides every key after its query (causal, possibly
    AND segments) and L == S: the queries go in blocks of that many positions, and block i
    attends only to keys ``[0, (i + 1) * causal_block)``; the keys after that are masked
    anyway, so the result is the same with the upper triangle of blocks never computed
    (4 blocks of 64 at L = 256: 62.5 % of the full products, 4 % of the CPU step).
    """
    scale = jnp.asarray(q_BxLxHxK.shape[-1] ** -0.5, q_BxLxHxK.dtype)

    def heads_first(x_BxTxHxK: Array) -> Array:
        return x_BxTxHxK.transpose(0, 2, 1, 3)

    q, k, v = heads_first(q_BxLxHxK * scale), heads_first(k_BxSxHxK), heads_first(v_BxSxHxK)
    core = _attention_core if backward.resolve(custom_backward) else _attention_plain
    length = q.shape[2]
    blocks = length // causal_block if causal_block else 1
    if blocks <= 1 or length % causal_block or k.shape[2] != length:
        return core(q, k, v, mask_Bx1xLxS).transpose(0, 2, 1, 3)
    outs = []
    for i in range(blocks):
        rows, keys = (
            slice(i * causal_block, (i + 1) * causal_block),
            slice(0, (i + 1) * causal_block),
        )
        block_mask = mask_Bx1xLxS[:, :, rows, keys]
        outs.append(core(q[:, :, rows], k[:, :, keys], v[:, :, keys], block_mask))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


def _product(spec: str, a: Array, b: Array) -> Array:
    """An einsum of two operands in their (shared) dtype, accumulated and returned in f32."""
    dtype = a.dtype
    return jnp.einsum(spec, a, b.astype(dtype), preferred_element_type=jnp.float32)


def _probabilities(q_BxHxLxK: Array, k_BxHxSxK: Array, mask_Bx1xLxS: Array) -> Array:
    scores_BxHxLxS = _product("bhlk,bhsk->bhls", q_BxHxLxK, k_BxHxSxK)
    scores_BxHxLxS = jnp.where(mask_Bx1xLxS, scores_BxHxLxS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores_BxHxLxS, axis=-1)


def _weighted_values(probs_BxHxLxS: Array, v_BxHxSxK: Array, dtype) -> Array:
    return _product("bhls,bhsk->bhlk", probs_BxHxLxS.astype(dtype), v_BxHxSxK).astype(dtype)


def _attention_plain(q_BxHxLxK: Array, k_BxHxSxK: Array, v_BxHxSxK: Array, mask_Bx1xLxS: Array):
    """The forward of :func:`_attention_core`, differentiated by autodiff."""
    probs_BxHxLxS = _probabilities(q_BxHxLxK, k_BxHxSxK, mask_Bx1xLxS)
    return _weighted_values(probs_BxHxLxS, v_BxHxSxK, q_BxHxLxK.dtype)


@jax.custom_vjp
def _attention_core(q_BxHxLxK: Array, k_BxHxSxK: Array, v_BxHxSxK: Array, mask_Bx1xLxS: Array):
    return _core_fwd(q_BxHxLxK, k_BxHxSxK, v_BxHxSxK, mask_Bx1xLxS)[0]


def _core_fwd(q_BxHxLxK, k_BxHxSxK, v_BxHxSxK, mask_Bx1xLxS):
    probs_BxHxLxS = _probabilities(q_BxHxLxK, k_BxHxSxK, mask_Bx1xLxS)
    out_BxHxLxK = _weighted_values(probs_BxHxLxS, v_BxHxSxK, q_BxHxLxK.dtype)
    return out_BxHxLxK, (q_BxHxLxK, k_BxHxSxK, v_BxHxSxK, mask_Bx1xLxS, probs_BxHxLxS, out_BxHxLxK)


def _core_bwd(residuals, dout_BxHxLxK):
    q_BxHxLxK, k_BxHxSxK, v_BxHxSxK, mask_Bx1xLxS, probs_BxHxLxS, out_BxHxLxK = residuals
    dtype = q_BxHxLxK.dtype
    dout_BxHxLxK = dout_BxHxLxK.astype(dtype)
    dv = _product("bhls,bhlk->bhsk", probs_BxHxLxS.astype(dtype), dout_BxHxLxK)
    dprobs_BxHxLxS = _product("bhlk,bhsk->bhls", dout_BxHxLxK, v_BxHxSxK)
    # softmax backward: dS = P * (dP - sum_s P dP), and sum_s P dP = sum_k dO O
    row_BxHxLx1 = jnp.sum(
        dout_BxHxLxK.astype(jnp.float32) * out_BxHxLxK.astype(jnp.float32), -1, keepdims=True
    )
    dscores_BxHxLxS = (probs_BxHxLxS * (dprobs_BxHxLxS - row_BxHxLx1)).astype(dtype)
    dq = _product("bhls,bhsk->bhlk", dscores_BxHxLxS, k_BxHxSxK)
    dk = _product("bhls,bhlk->bhsk", dscores_BxHxLxS, q_BxHxLxK)
    return (
        dq.astype(dtype),
        dk.astype(k_BxHxSxK.dtype),
        dv.astype(v_BxHxSxK.dtype),
        np.zeros(mask_Bx1xLxS.shape, jax.dtypes.float0),  # a boolean input has no gradient
    )


_attention_core.defvjp(_core_fwd, _core_bwd)
