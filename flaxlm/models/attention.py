"""Attention: the choice of kernel (:func:`attention`, ``model.attention_impl``), and softmax
attention with a hand-written backward pass (``flaxlm``, what ``auto`` runs on the CPU).
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

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.config import CHOICES
from flaxlm.models import backward
from flaxlm.models.context_parallel import context_attention, context_size
from flaxlm.models.masks import Mask
from flaxlm.models.platform import auto_attention, cudnn_supports

Array = jax.Array

IMPLEMENTATIONS = CHOICES["model.attention_impl"]


def attention(
    q_BxLxHxK: Array,
    k_BxSxNxK: Array,
    v_BxSxNxK: Array,
    mask: Mask,
    impl: str = "auto",
    causal_block: int = 0,
    custom_backward: bool | None = None,
) -> Array:
    """Multi-head softmax attention, ``out_BxLxHxK`` in the inputs' dtype.

    ``N`` key/value heads, N dividing H: N == H is multi-head, N == 1 multi-query, else
    grouped-query attention (query head h reads key/value head h // (H / N)). ``mask`` says
    which keys each query sees (flaxlm/models/masks.py). ``impl``:

    - ``auto``: by the platform being compiled for (flaxlm/models/platform.py): ``splash`` on
      TPU, ``triton`` on GPU, ``flaxlm`` on CPU;
    - ``flaxlm``: :func:`softmax_attention` over the dense mask (CPU);
    - ``xla`` / ``cudnn``: ``jax.nn.dot_product_attention`` (cuDNN needs a GPU and bf16 /
      fp16): the causal part is the kernel's own ``is_causal``; segments go in as a dense
      mask, since that API has no segment ids;
    - ``splash``: the Pallas TPU splash-attention kernel (flaxlm/models/splash.py), causal or
      full with segment ids, no dense mask.
    - ``triton``: the Pallas GPU flash kernel (flaxlm/models/gpu_flash.py), causal or full with
      segment ids, no dense mask; for a shape it cannot tile, ``cudnn`` where cuDNN takes the
      dtype and head dim (:func:`flaxlm.models.platform.cudnn_supports`), else ``xla``.

    With ``mesh.context`` > 1 the sequence is split: :func:`flaxlm.models.context_parallel.
    context_attention` (splash or the dense kernel per shard, keys and values gathered).
    Decoding with a KV cache (queries at an offset) runs the dense path whatever ``impl``:
    one query row per token, so the mask is ``B x 1 x 1 x S``.
    ``causal_block`` and ``custom_backward``: see :func:`softmax_attention`.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention_impl={impl!r} is not one of {', '.join(IMPLEMENTATIONS)}"
        )
    heads, kv_heads = q_BxLxHxK.shape[2], k_BxSxNxK.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{kv_heads} key/value heads do not divide {heads} query heads")
    if impl == "auto":
        impl = auto_attention()
    if context_size() > 1:  # the sequence is split over mesh.context
        dense = functools.partial(_context_dense, impl=impl, custom_backward=custom_backward)
        return context_attention(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask, impl, dense)
    if impl == "triton":
        impl = gpu_kernel(q_BxLxHxK, mask)
        if impl == "triton":
            from flaxlm.models.gpu_flash import gpu_flash_attention

            return gpu_flash_attention(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask)
    if impl == "splash":
        from flaxlm.models.splash import block_size, splash_attention

        if mask.is_training_shape and block_size(q_BxLxHxK.shape[1]):
            return splash_attention(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask)
        impl = "xla"  # a decode step, or a length the kernel cannot tile
    if mask.prefix_len_B is not None and impl != "flaxlm" and mask.is_training_shape:
        causal, within_prefix, use_prefix_BxL = mask.split_prefix()
        both = [
            attention(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, m, impl) for m in (causal, within_prefix)
        ]
        return jnp.where(use_prefix_BxL[:, :, None, None], both[1], both[0])
    if impl == "flaxlm":
        k_BxSxHxK, v_BxSxHxK = repeat_kv(k_BxSxNxK, heads), repeat_kv(v_BxSxNxK, heads)
        return softmax_attention(
            q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask.dense(), causal_block, custom_backward
        )
    return _dot_product_attention(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask, impl)


def gpu_kernel(q_BxLxHxK: Array, mask: Mask) -> str:
    """What ``triton`` runs for these queries and mask: ``triton`` (the Pallas GPU flash
    kernel) where it tiles the shape, else ``cudnn`` where cuDNN's fused attention takes the
    dtype and head dim, else ``xla``. A decode step (queries over a KV cache) is ``xla``."""
    from flaxlm.models.gpu_flash import supports

    _, length, _, head_dim = q_BxLxHxK.shape
    if not mask.is_training_shape:
        return "xla"
    if supports(length, head_dim):
        return "triton"
    return "cudnn" if cudnn_supports(q_BxLxHxK.dtype, head_dim) else "xla"


def _context_dense(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask_Bx1xLxS, impl: str, custom_backward):
    """One context shard's queries over the whole row's keys (a dense mask): flaxlm's softmax
    attention, else ``jax.nn.dot_product_attention`` (splash runs inside context_attention)."""
    if impl == "flaxlm":
        heads = q_BxLxHxK.shape[2]
        k_BxSxHxK, v_BxSxHxK = repeat_kv(k_BxSxNxK, heads), repeat_kv(v_BxSxNxK, heads)
        return softmax_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xLxS, 0, custom_backward)
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask=mask_Bx1xLxS,
        implementation="cudnn" if impl == "cudnn" else None,
    )  # fmt: skip


def repeat_kv(x_BxSxNxK: Array, heads: int) -> Array:
    """Key/value heads repeated to ``heads`` (GQA: each serves heads / N query heads)."""
    repeats = heads // x_BxSxNxK.shape[2]
    return x_BxSxNxK if repeats == 1 else jnp.repeat(x_BxSxNxK, repeats, axis=2)


def _dot_product_attention(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask: Mask, impl: str) -> Array:
    """``jax.nn.dot_product_attention`` (xla / cudnn): GQA natively; causal as the kernel's
    ``is_causal`` where queries and keys line up, the segment part as a dense mask."""
    if mask.causal and mask.is_training_shape and mask.prefix_len_B is None:
        segments = Mask.segments(mask.q_segment_ids_BxL).dense()
        return jax.nn.dot_product_attention(
            q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask=segments, is_causal=True, implementation=impl
        )
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask=mask.dense(), implementation=impl
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
