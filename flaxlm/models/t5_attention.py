"""T5 attention: the bucketed relative position bias, and the kernels that take it.

T5 has no absolute positions. Each self-attention score gets a learned scalar per head,
looked up by the *bucket* of the key's offset from the query (``key_pos - query_pos``):
offsets below ``buckets / 2`` (bidirectional: per direction, so half the buckets each) have a
bucket each, longer ones share logarithmically wider buckets up to ``max_distance``, beyond
which all share the last. The table ``(buckets, heads)`` is one per stack (encoder, decoder),
shared by its layers. The encoder's is bidirectional; the decoder's sees only the past.
Cross-attention has no position bias.

Scores: flaxlm's attention scales ``q . k`` by ``1 / sqrt(K)`` (every kernel does); T5 does
not (its init folds the scale into the query weights). The HF converter (flaxlm/hf/t5.py)
multiplies T5's query kernel by ``sqrt(K)`` on the way in and divides on the way out, so
both compute the same scores.

Kernels (``model.attention_impl``, resolved per platform as for the other families):

- self-attention with the bias: on TPU (``splash``) the Pallas TPU flash kernel, which takes a
  dense additive bias ``ab`` and segment ids (splash takes no bias), inside ``shard_map``;
  elsewhere a dense softmax over ``scores + bias`` (autodiff).
- cross-attention (queries from the decoder, keys from the encoder; ``L != S``, segment ids
  on both sides): splash on TPU (:func:`flaxlm.models.splash.splash_attention` with separate
  query and key lengths), else :func:`flaxlm.models.attention.attention` with a dense mask.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec

from flaxlm.models.attention import attention, repeat_kv
from flaxlm.models.masks import Mask
from flaxlm.models.platform import auto_attention, current_platform
from flaxlm.models.splash import block_size

Array = jax.Array


def relative_bucket(
    relative_BxLxS: Array, bidirectional: bool, buckets: int, max_distance: int
) -> Array:
    """The bucket (int32, ``0 .. buckets - 1``) of each offset ``key_pos - query_pos``.

    Bidirectional: keys after the query take the upper half of the buckets. Causal: only
    offsets <= 0 are told apart (later keys are masked anyway). Within a direction, the
    first ``n / 2`` distances have a bucket each (``n`` buckets per direction); longer
    distances are binned on a log scale between ``n / 2`` and ``max_distance``."""
    offset = relative_BxLxS.astype(jnp.int32)
    bucket = jnp.zeros_like(offset)
    if bidirectional:
        buckets //= 2
        bucket = bucket + (offset > 0).astype(jnp.int32) * buckets
        distance = jnp.abs(offset)
    else:
        distance = -jnp.minimum(offset, 0)
    exact = buckets // 2
    # float32 as in the reference implementation, so both bin a distance alike
    ratio = jnp.maximum(distance, 1).astype(jnp.float32) / exact
    scaled = jnp.log(ratio) / math.log(max_distance / exact) * (buckets - exact)
    large = jnp.minimum(exact + scaled.astype(jnp.int32), buckets - 1)
    return bucket + jnp.where(distance < exact, distance, large)


class RelativeBias(nn.Module):
    """The per-head bias of every (query, key) pair from their positions: ``bias_BxHxLxS``
    float32. One table ``(buckets, heads)`` (logical axes ``position``, ``heads``)."""

    heads: int
    buckets: int
    max_distance: int
    bidirectional: bool
    param_dtype: jnp.dtype = jnp.float32
    std: float = 0.02

    @nn.compact
    def __call__(self, q_positions_BxL: Array, k_positions_BxS: Array) -> Array:
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.std), ("position", "heads")),
            (self.buckets, self.heads),
            self.param_dtype,
        )
        offset_BxLxS = k_positions_BxS[:, None, :] - q_positions_BxL[:, :, None]
        bucket_BxLxS = relative_bucket(
            offset_BxLxS, self.bidirectional, self.buckets, self.max_distance
        )
        bias_BxLxSxH = jnp.take(table.astype(jnp.float32), bucket_BxLxS, axis=0)
        return bias_BxLxSxH.transpose(0, 3, 1, 2)


def t5_attention(
    q_BxLxHxK: Array,
    k_BxSxNxK: Array,
    v_BxSxNxK: Array,
    mask: Mask,
    bias_BxHxLxS: Array | None,
    impl: str = "auto",
) -> Array:
    """``softmax(q k^T / sqrt(K) + bias, masked) v``; ``out_BxLxHxK`` in q's dtype. ``bias``
    None: cross-attention (no position bias). ``impl``: ``model.attention_impl``."""
    impl = auto_attention() if impl == "auto" else impl
    length, keys = q_BxLxHxK.shape[1], k_BxSxNxK.shape[1]
    tiles = block_size(length) and block_size(keys) and not mask.decoding
    if bias_BxHxLxS is None:
        if impl == "splash" and tiles:
            from flaxlm.models.splash import splash_attention

            return splash_attention(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask)
        if impl == "splash" or not mask.is_training_shape:
            impl = "xla" if impl != "flaxlm" else impl
        return attention(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask, impl)
    if impl == "splash" and tiles:
        return flash_biased(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask, bias_BxHxLxS)
    return dense_biased(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask.dense(), bias_BxHxLxS)


def dense_biased(
    q_BxLxHxK: Array, k_BxSxNxK: Array, v_BxSxNxK: Array, mask_Bx1xLxS: Array, bias_BxHxLxS: Array
) -> Array:
    """The reference path: products in the inputs' dtype accumulated in float32, a float32
    softmax over ``scores + bias`` with masked keys at the float32 minimum."""
    heads, dtype = q_BxLxHxK.shape[2], q_BxLxHxK.dtype
    k_BxSxHxK, v_BxSxHxK = repeat_kv(k_BxSxNxK, heads), repeat_kv(v_BxSxNxK, heads)
    scale = jnp.asarray(q_BxLxHxK.shape[-1] ** -0.5, dtype)
    scores_BxHxLxS = jnp.einsum(
        "blhk,bshk->bhls", q_BxLxHxK * scale, k_BxSxHxK.astype(dtype),
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    scores_BxHxLxS = scores_BxHxLxS + bias_BxHxLxS.astype(jnp.float32)
    scores_BxHxLxS = jnp.where(mask_Bx1xLxS, scores_BxHxLxS, jnp.finfo(jnp.float32).min)
    probs_BxHxLxS = jax.nn.softmax(scores_BxHxLxS, axis=-1)
    out_BxLxHxK = jnp.einsum(
        "bhls,bshk->blhk", probs_BxHxLxS.astype(dtype), v_BxSxHxK.astype(dtype),
        preferred_element_type=jnp.float32,
    )  # fmt: skip
    return out_BxLxHxK.astype(dtype)


def flash_biased(
    q_BxLxHxK: Array, k_BxSxNxK: Array, v_BxSxNxK: Array, mask: Mask, bias_BxHxLxS: Array
) -> Array:
    """The Pallas TPU flash kernel (``jax.experimental.pallas.ops.tpu.flash_attention``) with
    the bias as its ``ab`` operand and the mask as segment ids plus its causal flag; inside
    ``shard_map`` under a mesh (rows as the batch, heads as the rules place them)."""
    heads = q_BxLxHxK.shape[2]
    k_BxSxHxK, v_BxSxHxK = repeat_kv(k_BxSxNxK, heads), repeat_kv(v_BxSxNxK, heads)
    run = functools.partial(
        _flash_local,
        causal=mask.causal,
        scale=q_BxLxHxK.shape[-1] ** -0.5,
        interpret=current_platform() != "tpu",
    )
    args = (q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask.q_segment_ids_BxL, mask.kv_segment_ids_BxS)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(*args, bias_BxHxLxS)
    batch, _, head_axis, _ = nn.logical_to_mesh_axes(
        ("act_batch", "act_length", "act_heads", "act_kv")
    )
    qkv, seg = PartitionSpec(batch, None, head_axis, None), PartitionSpec(batch, None)
    bias = PartitionSpec(batch, head_axis, None, None)
    return jax.shard_map(
        run, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg, bias), out_specs=qkv, check_vma=False
    )(*args, bias_BxHxLxS)


def _flash_local(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, q_seg_BxL, kv_seg_BxS, bias_BxHxLxS, **kw):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    dtype = q_BxLxHxK.dtype
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_BxLxHxK, k_BxSxHxK, v_BxSxHxK))
    block_q, block_k = block_size(q.shape[2]), block_size(k.shape[2])
    sizes = fa.BlockSizes(
        block_q=block_q, block_k_major=block_k, block_k=block_k, block_b=1,
        block_q_major_dkv=block_q, block_k_major_dkv=block_k, block_k_dkv=block_k,
        block_q_dkv=block_q, block_k_major_dq=block_k, block_k_dq=block_k, block_q_dq=block_q,
    )  # fmt: skip
    segments = fa.SegmentIds(q=q_seg_BxL.astype(jnp.int32), kv=kv_seg_BxS.astype(jnp.int32))
    if kw["interpret"]:
        # No TPU: the same math densely (the kernel's interpret mode is slow on CPU).
        same_BxLxS = q_seg_BxL[:, :, None] == kv_seg_BxS[:, None, :]
        if kw["causal"]:
            same_BxLxS &= jnp.tril(jnp.ones(same_BxLxS.shape[1:], bool))[None]
        return dense_biased(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, same_BxLxS[:, None], bias_BxHxLxS)
    out = fa.flash_attention(
        q, k, v, ab=bias_BxHxLxS.astype(dtype), segment_ids=segments, causal=kw["causal"],
        sm_scale=kw["scale"], block_sizes=sizes,
    )  # fmt: skip
    return out.transpose(0, 2, 1, 3).astype(dtype)
