"""Splash attention (``model.attention_impl: splash``, what ``auto`` picks on TPU): the Pallas
TPU kernel from ``jax.experimental.pallas.ops.tpu.splash_attention``, fed flaxlm's masks.

- **Masks without a dense array.** The kernel takes a static per-head mask (causal or full,
  turned into block tables at trace time, so fully masked blocks are skipped) and segment ids
  per row, compared inside the kernel. That covers packed documents, BERT padding (segment 0)
  and causal decoding. The unified objective's per-row prefix LM is not a static mask: it
  runs as two kernel calls, one causal and one bidirectional over the prefix keys
  (:meth:`flaxlm.models.masks.Mask.split_prefix`), and each query takes the one its position
  needs — exact, at ~1.5x the attention FLOPs of one call, only for the unified objective.
- **GQA / MQA.** The multi-query kernel runs once per key/value head over its group of query
  heads (a vmap), so keys and values are never repeated in memory.
- **Sharding.** A Mosaic kernel cannot be partitioned by XLA, so under a mesh the kernel runs
  inside ``shard_map``: rows split as the batch is (data, fsdp), heads as the rules put them
  (tensor); each device runs the kernel on its own rows and heads, whole sequences.
- **Scale.** The kernel does not scale the scores: queries are multiplied by 1/sqrt(K) first.
- **Block sizes.** The largest of 512, 256, 128 that divides the sequence length. For a length
  no multiple of 128 (tiny test configs) :func:`flaxlm.models.attention.attention` runs
  ``jax.nn.dot_product_attention`` instead, since the TPU's lanes are 128 wide.

On a CPU the kernel runs in Pallas interpret mode (tests/test_splash.py checks forward and
gradients against the dense reference for every mask kind); on TPU the tests compile it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models.masks import Mask
from flaxlm.models.platform import current_platform, kernel_specs

Array = jax.Array
BLOCKS = (512, 256, 128)


def block_size(length: int) -> int | None:
    """The kernel's tile along the sequence: the largest of BLOCKS dividing ``length``."""
    return next((b for b in BLOCKS if length % b == 0), None)


def splash_attention(q_BxLxHxK: Array, k_BxLxNxK: Array, v_BxLxNxK: Array, mask: Mask) -> Array:
    """``softmax(q k^T / sqrt(K) masked) v`` through the splash kernel; ``out_BxLxHxK``."""
    length, kv_length = q_BxLxHxK.shape[1], k_BxLxNxK.shape[1]
    if block_size(length) is None or block_size(kv_length) is None:
        raise ValueError(
            f"splash attention tiles lengths that are multiples of 128, not {length} "
            f"(queries) and {kv_length} (keys)"
        )
    if mask.prefix_len_B is not None:
        causal, within_prefix, use_prefix_BxL = mask.split_prefix()
        both = [
            splash_attention(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, m) for m in (causal, within_prefix)
        ]
        return jnp.where(use_prefix_BxL[:, :, None, None], both[1], both[0])
    interpret = current_platform() != "tpu"
    run = functools.partial(_splash_local, causal=mask.causal, interpret=interpret)
    scale = jnp.asarray(q_BxLxHxK.shape[-1] ** -0.5, q_BxLxHxK.dtype)
    args = (
        q_BxLxHxK * scale,
        k_BxLxNxK,
        v_BxLxNxK,
        mask.q_segment_ids_BxL,
        mask.kv_segment_ids_BxS,
    )
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(*args)
    qkv, segments = kernel_specs("splash attention", k_BxLxNxK.shape[2], mesh)
    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, segments, segments),
        out_specs=qkv,
        check_vma=False,
    )(*args)


def _splash_local(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, q_seg_BxL, kv_seg_BxL, causal, interpret):
    """The kernel on one device's rows and heads (no mesh inside). The keys may be a
    different length than the queries (T5's cross-attention: full mask, segment ids)."""
    _, length, heads, _ = q_BxLxHxK.shape
    kv_length = k_BxLxNxK.shape[1]
    kv_length = None if kv_length == length else kv_length
    kernel = _kernel(length, heads // k_BxLxNxK.shape[2], causal, interpret, kv_length=kv_length)
    return run_mqa(kernel, q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, q_seg_BxL, kv_seg_BxL)


def run_mqa(kernel, q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, q_seg_BxL, kv_seg_BxS) -> Array:
    """An MQA splash ``kernel`` per row and per key/value head over its group of query heads
    (queries already scaled). L may be a shard of S's sequence (context parallelism: the
    kernel's block tables are then that shard's)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    _, length, heads, _ = q_BxLxHxK.shape
    kv_heads = k_BxSxNxK.shape[2]
    group = heads // kv_heads
    dtype = q_BxLxHxK.dtype
    # Per row, per key/value head: q (group, L, K) with k, v (S, K) — the MQA kernel.
    q_BxNxGxLxK = q_BxLxHxK.reshape(-1, length, kv_heads, group, q_BxLxHxK.shape[-1]).transpose(
        0, 2, 3, 1, 4
    )
    k_BxNxSxK, v_BxNxSxK = k_BxSxNxK.transpose(0, 2, 1, 3), v_BxSxNxK.transpose(0, 2, 1, 3)

    def one_row(q_NxGxLxK, k_NxSxK, v_NxSxK, q_seg_L, kv_seg_S):
        segments = sk.SegmentIds(q=q_seg_L.astype(jnp.int32), kv=kv_seg_S.astype(jnp.int32))
        per_head = jax.vmap(lambda q, k, v: kernel(q, k.astype(dtype), v.astype(dtype), segments))
        return per_head(q_NxGxLxK, k_NxSxK, v_NxSxK)

    out_BxNxGxLxK = jax.vmap(one_row)(q_BxNxGxLxK, k_BxNxSxK, v_BxNxSxK, q_seg_BxL, kv_seg_BxS)
    return out_BxNxGxLxK.transpose(0, 3, 1, 2, 4).reshape(q_BxLxHxK.shape).astype(dtype)


def context_kernel(
    length: int, heads: int, causal: bool, shards: int, order: np.ndarray | None = None
):
    """The MQA splash kernel for a sequence split over ``shards`` context shards
    (flaxlm/models/context_parallel.py): its block tables split by query shard
    (``q_seq_shards``); ``order`` (causal only): the original index of each query row (the
    load-balanced order), which the causal mask compares with the key's. Pass it through
    ``shard_map`` with ``kernel.manual_sharding_spec``."""
    interpret = current_platform() != "tpu"
    return _kernel(
        length, heads, causal, interpret, shards, None if order is None else order.tobytes()
    )


@functools.lru_cache(maxsize=32)
def _kernel(
    length: int,
    heads: int,
    causal: bool,
    interpret: bool,
    q_shards: int = 1,
    q_order: bytes | None = None,
    kv_length: int | None = None,
):
    """The MQA splash kernel for ``heads`` query heads over one key/value head; ``q_order``
    (int32 bytes): the original index of each query row, for a causal mask over reordered
    queries; ``q_shards``: the query shards its block tables are split into; ``kv_length``:
    keys of another length than the queries (None: the same)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (length, kv_length or length)
    one = sm.CausalMask(shape) if causal else sm.FullMask(shape)
    if q_order is not None:
        one.q_sequence = np.frombuffer(q_order, np.int32).copy()
    b = block_size(length // q_shards)
    kb = b if kv_length is None else block_size(kv_length)
    blocks = sk.BlockSizes(
        block_q=b, block_kv=kb, block_kv_compute=kb,
        block_q_dkv=b, block_kv_dkv=kb, block_kv_dkv_compute=kb,
        block_q_dq=b, block_kv_dq=kb,
    )  # fmt: skip
    return sk.make_splash_mqa(
        sm.MultiHeadMask([one] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=q_shards,
        interpret=interpret,
    )
