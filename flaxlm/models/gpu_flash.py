"""Flash attention for NVIDIA GPUs with segment ids (``model.attention_impl: triton``, what
``auto`` picks on GPU for training shapes): the Pallas GPU kernel
``jax.experimental.pallas.ops.gpu.attention.mha``, compiled by Triton, fed flaxlm's masks.

- **Masks without a dense array.** The kernel compares segment ids inside each tile and
  applies the causal rule by position, so packed documents, BERT padding (segment 0) and
  causal rows never become a ``B x 1 x L x S`` array. cuDNN's fused attention (through
  ``jax.nn.dot_product_attention``) has no segment ids: packed rows would reach it as a dense
  mask. The unified objective's per-row prefix LM runs as two calls, one causal and one
  bidirectional over the prefix (:meth:`flaxlm.models.masks.Mask.split_prefix`), as splash
  does on TPU.
- **GQA / MQA.** The kernel reads one key/value head per query head: key/value heads are
  repeated to the query heads first (per device, inside ``shard_map``).
- **Sharding.** XLA cannot partition a Pallas kernel, so under a mesh it runs inside
  ``shard_map``: rows split as the batch is (data, fsdp), heads as the rules put them
  (tensor); each device runs the kernel on its own rows and heads, whole sequences.
- **Tiles.** Query and key tiles of the largest of 128, 64, 32, 16 that divides the length
  (32 at most for the backward kernels); head dims 16 to 256, powers of two
  (:func:`supports`). Other shapes take the next kernel (flaxlm/models/attention.py).

On a CPU the kernel runs in Pallas interpret mode (tests/test_gpu_attention.py checks forward
and gradients against the dense reference for every mask kind); tests/test_gpu_compile.py
compiles it for H100s with the XLA GPU compiler.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flaxlm.models.masks import Mask
from flaxlm.models.platform import current_platform, kernel_specs

Array = jax.Array
BLOCKS = (128, 64, 32, 16)
BACKWARD_BLOCK = 32
HEAD_DIMS = (16, 32, 64, 128, 256)


def block_size(length: int) -> int | None:
    """The forward kernel's tile along the sequence: the largest of BLOCKS dividing it."""
    return next((b for b in BLOCKS if length % b == 0), None)


def supports(length: int, head_dim: int) -> bool:
    """Whether the kernel tiles a sequence of ``length`` with heads of ``head_dim``."""
    return block_size(length) is not None and head_dim in HEAD_DIMS


def gpu_flash_attention(q_BxLxHxK: Array, k_BxLxNxK: Array, v_BxLxNxK: Array, mask: Mask) -> Array:
    """``softmax(q k^T / sqrt(K) masked) v`` through the Pallas GPU kernel; ``out_BxLxHxK``
    in the inputs' dtype. ``mask`` must be a training-shape mask (queries = keys)."""
    _, length, heads, head_dim = q_BxLxHxK.shape
    if not supports(length, head_dim):
        raise ValueError(
            f"the GPU flash kernel tiles lengths that are multiples of 16 with head dims in "
            f"{HEAD_DIMS}, not length {length}, head dim {head_dim}"
        )
    if mask.prefix_len_B is not None:
        causal, within_prefix, use_prefix_BxL = mask.split_prefix()
        both = [
            gpu_flash_attention(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, m) for m in (causal, within_prefix)
        ]
        return jnp.where(use_prefix_BxL[:, :, None, None], both[1], both[0])
    interpret = current_platform() not in ("gpu", "cuda")
    run = functools.partial(_flash_local, causal=mask.causal, interpret=interpret)
    args = (q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, mask.q_segment_ids_BxL)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(*args)
    qkv, segments = kernel_specs("GPU flash attention", k_BxLxNxK.shape[2], mesh)
    return jax.shard_map(
        run, mesh=mesh, in_specs=(qkv, qkv, qkv, segments), out_specs=qkv, check_vma=False
    )(*args)


def _flash_local(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, segment_ids_BxL, causal: bool, interpret: bool):
    """The kernel on one device's rows and heads (no mesh inside)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    _, length, heads, head_dim = q_BxLxHxK.shape
    repeats = heads // k_BxLxNxK.shape[2]
    dtype = q_BxLxHxK.dtype
    k_BxLxHxK, v_BxLxHxK = (
        jnp.repeat(x.astype(dtype), repeats, axis=2) if repeats > 1 else x.astype(dtype)
        for x in (k_BxLxNxK, v_BxLxNxK)
    )
    block = block_size(length)
    backward = min(block, BACKWARD_BLOCK)
    blocks = pallas_gpu.BlockSizes(
        block_q=block, block_k=block,
        block_q_dkv=backward, block_kv_dkv=backward, block_q_dq=backward, block_kv_dq=backward,
    )  # fmt: skip
    return pallas_gpu.mha(
        q_BxLxHxK,
        k_BxLxHxK,
        v_BxLxHxK,
        segment_ids_BxL.astype(jnp.int32),
        sm_scale=head_dim**-0.5,
        causal=causal,
        block_sizes=blocks,
        interpret=interpret,
    ).astype(dtype)
