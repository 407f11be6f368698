"""Context parallelism: the sequence split over the ``context`` mesh axis (``mesh.context``).

Activations' ``act_length`` lives on ``context`` (flaxlm/parallel/sharding.py); every layer
but attention is per token, so only attention talks across the axis. It does so explicitly,
inside ``shard_map`` (:func:`context_attention`): each shard keeps its own queries and
all-gathers the keys, values and key segment ids of the whole row, then runs the platform's
kernel on its query rows — splash on TPU (its block tables split over the query shards),
the dense CPU kernels elsewhere.

**Load balance.** Under a causal mask the last queries see the most keys, so contiguous
shards would give the last device ~2n-1 times the first one's work. A decoder's rows are
therefore reordered inside the model (:func:`load_balance`): the sequence is cut into 2n
chunks and shard ``i`` holds chunks ``i`` and ``2n-1-i`` — equal causal work on every shard.
Tokens, positions and segment ids move together, so RoPE sees each token's true position and
segments stay exact; the causal rule compares the tokens' original indices. The final hidden
states go back to the original order (:func:`restore_order`, point-to-point sends) before
the LM head, so the batch, the labels and the loss never see the reordering.

    order = load_balanced_order(8, 2)  # [0, 1, 6, 7, 2, 3, 4, 5]: shard 0 = chunks 0, 3

A causal mask under ``mesh.context`` > 1 means "rows in this order" (only the decoder
makes causal masks); a bidirectional one (an encoder) keeps the rows in their own order.
KV-cache decoding and prefix-LM rows are refused with ``mesh.context`` > 1.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from flaxlm.models.masks import Mask

Array = jax.Array
AXIS = "context"


def context_size() -> int:
    """How many ways the sequence is split: the ``context`` axis of the mesh in scope (1
    without a mesh or without the axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[AXIS])


def _check_length(length: int, shards: int) -> None:
    if length % (2 * shards):
        raise ValueError(
            f"mesh.context={shards}: the sequence length {length} must be a multiple of "
            f"2 x {shards} = {2 * shards} (two chunks per context shard)"
        )


def load_balanced_order(length: int, shards: int) -> np.ndarray:
    """``order[i]`` = the original index of the token at reordered position ``i``: the 2n
    chunks in the order ``0, 2n-1, 1, 2n-2, ...`` (shard i holds chunks i and 2n-1-i)."""
    _check_length(length, shards)
    chunk = length // (2 * shards)
    chunks = [c for s in range(shards) for c in (s, 2 * shards - 1 - s)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks]).astype(np.int32)


def load_balance(x_BxL: Array, shards: int) -> Array:
    """A row-wise array (tokens, positions, segment ids) in :func:`load_balanced_order`.
    The rows arrive whole on every context shard (the batch is not split over context), so
    this is a local gather."""
    if shards == 1:
        return x_BxL
    return jnp.take(x_BxL, load_balanced_order(x_BxL.shape[1], shards), axis=1)


def restore_order(x_BxLxD: Array, shards: int) -> Array:
    """Hidden states in :func:`load_balanced_order` back in the original order, still split
    over ``context``: shard d ends up with chunks 2d and 2d+1. Four partial ``ppermute`` s
    (from the first / second chunk a shard holds to the first / second slot of its target);
    each moves one chunk per shard at most, and a slot receives from exactly one of the two."""
    if shards == 1:
        return x_BxLxD
    _check_length(x_BxLxD.shape[1], shards)
    holder = {c: (c, 0) if c < shards else (2 * shards - 1 - c, 1) for c in range(2 * shards)}

    def local(x_bx2CxD: Array) -> Array:
        halves = jnp.split(x_bx2CxD, 2, axis=1)
        slots = []
        for slot in range(2):
            moved = []
            for half in range(2):
                pairs = [
                    (holder[c][0], c // 2)
                    for c in range(2 * shards)
                    if c % 2 == slot and holder[c][1] == half
                ]
                if pairs:
                    moved.append(jax.lax.ppermute(halves[half], AXIS, pairs))
            slots.append(sum(moved[1:], moved[0]))
        return jnp.concatenate(slots, axis=1)

    mesh = jax.sharding.get_abstract_mesh()
    spec = PartitionSpec(_batch_axes(mesh, x_BxLxD.shape[0]), AXIS, None)
    return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(x_BxLxD)


def _original_order(x_BxL: Array, shards: int) -> Array:
    """A gathered row (``x_BxL...``, chunks in load-balanced order) in its original order:
    static slices, local."""
    chunk = x_BxL.shape[1] // (2 * shards)
    order = load_balanced_order(2 * shards, shards)  # where each chunk sits
    where = np.argsort(order)
    pieces = [x_BxL[:, w * chunk : (w + 1) * chunk] for w in where]
    return jnp.concatenate(pieces, axis=1)


def _ways(mesh, axes) -> int:
    names = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[n] for n in names]))


def _batch_axes(mesh, rows: int):
    """Where the rules put the rows, or nowhere (replicated) for a batch they do not divide
    (the one-row batch of ``init``)."""
    (batch,) = nn.logical_to_mesh_axes(("act_batch",))
    return batch if rows % _ways(mesh, batch) == 0 else None


def _specs(mesh, rows: int, kv_heads: int) -> tuple[PartitionSpec, PartitionSpec]:
    """Shard specs of ``B x L x H x K`` and ``B x L``: rows as the batch, the sequence over
    ``context``, heads as the rules put them."""
    batch = _batch_axes(mesh, rows)
    (heads,) = nn.logical_to_mesh_axes(("act_heads",))
    if heads is not None:
        ways = _ways(mesh, heads)
        if kv_heads % ways:
            raise ValueError(
                f"context attention: {kv_heads} key/value heads cannot be split over the "
                f"{ways} devices of mesh axis {heads}; make model.n_kv_heads a multiple of it"
            )
    return PartitionSpec(batch, AXIS, heads, None), PartitionSpec(batch, AXIS)


def context_attention(
    q_BxLxHxK: Array,
    k_BxLxNxK: Array,
    v_BxLxNxK: Array,
    mask: Mask,
    impl: str,
    dense: Callable[[Array, Array, Array, Array], Array],
) -> Array:
    """Attention with the sequence split over ``context`` (``out_BxLxHxK``, split so too).

    ``impl`` ``splash``: the TPU kernel, its causal mask over the reordered queries; any
    other: ``dense(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, mask_Bx1xLxS)`` on each shard's queries
    over the whole row's keys (flaxlm/models/attention.py passes its dense kernels)."""
    shards = context_size()
    if not mask.is_training_shape:
        raise ValueError(
            f"KV-cache decoding does not run with mesh.context={shards}; decode with mesh.context=1"
        )
    if mask.prefix_len_B is not None:
        raise ValueError(f"prefix-LM rows do not run with mesh.context={shards}; use 1")
    length = q_BxLxHxK.shape[1]
    _check_length(length, shards)
    mesh = jax.sharding.get_abstract_mesh()
    qkv, seg = _specs(mesh, q_BxLxHxK.shape[0], k_BxLxNxK.shape[2])
    args = (q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, mask.q_segment_ids_BxL, mask.kv_segment_ids_BxS)
    specs = (qkv, qkv, qkv, seg, seg)
    causal = mask.causal

    def gather(x_bxlx: Array) -> Array:
        full = jax.lax.all_gather(x_bxlx, AXIS, axis=1, tiled=True)
        return _original_order(full, shards) if causal else full

    if impl == "splash":
        from flaxlm.models import splash

        heads, kv_heads = q_BxLxHxK.shape[2], k_BxLxNxK.shape[2]
        order = load_balanced_order(length, shards) if causal else None
        kernel = splash.context_kernel(length, heads // kv_heads, causal, shards, order)
        kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(None, AXIS)))

        def local_splash(kernel, q, k, v, q_seg, kv_seg):
            q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # the kernel does not scale
            return splash.run_mqa(kernel, q, gather(k), gather(v), q_seg, gather(kv_seg))

        run = jax.shard_map(
            local_splash, mesh=mesh, in_specs=(kernel_spec, *specs), out_specs=qkv, check_vma=False
        )
        return run(kernel, *args)

    def local_dense(q, k, v, q_seg, kv_seg):
        k, v, kv_seg = gather(k), gather(v), gather(kv_seg)
        visible_bxLxS = q_seg[:, :, None] == kv_seg[:, None, :]
        if causal:
            rows = q.shape[1]
            start = jax.lax.axis_index(AXIS) * rows
            order = jnp.asarray(load_balanced_order(length, shards))
            q_index_L = jax.lax.dynamic_slice(order, (start,), (rows,))
            visible_bxLxS &= (q_index_L[:, None] >= jnp.arange(length)[None, :])[None]
        return dense(q, k, v, visible_bxLxS[:, None])

    run = jax.shard_map(local_dense, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)
    return run(*args)
