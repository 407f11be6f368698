"""Expert-parallel dispatch for the MoE layer (flaxlm/models/moe.py): each device sends its
(token, expert) pairs only to the devices of the ``expert`` mesh axis that hold those experts,
runs its local experts as one grouped matmul, and sends the results back.

Written explicitly inside ``shard_map`` over the whole mesh (XLA should not guess this
communication):

1. Per device, its kept pairs are sorted by expert (dropped pairs last, never sent); the
   per-expert counts are all-gathered over the ``expert`` axis, so every device knows how many
   rows each peer sends it, for each of its local experts.
2. **Forward exchange.** On TPU (``ragged=True``) ``jax.lax.ragged_all_to_all`` sends each
   peer exactly its rows. XLA:CPU has no ragged all-to-all, so the CPU path is its twin with the
   same semantics: a fixed-size ``jax.lax.all_to_all`` whose block per peer is padded to the
   most a device can send (all of its pairs).
3. The received rows are sorted by local expert and go through ``jax.lax.ragged_dot`` (the
   expert FFN); padding rows belong to no group and are left alone.
4. **Reverse exchange** (the same collective, sizes swapped) brings each pair's output home,
   where the router weights mix them per token.

The ``expert`` axis may be combined with ``data`` and ``fsdp`` (tokens are split over all
three; expert weights are split over ``expert`` and gathered over the rest), and with
``tensor`` (replicated work there). Without a mesh, or with one expert shard, it is the same
local sort + grouped matmul with no exchange.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec

from flaxlm.models.platform import current_platform

Array = jax.Array
# ffn(x_RxD, group_sizes_G, up, gate, down) -> y_RxD: the expert MLP as grouped matmuls.
ExpertFFN = Callable[..., Array]


def expert_parallel_mlp(
    x_BxLxD: Array,
    expert_BxLxK: Array,
    weight_BxLxK: Array,
    weights: tuple[Array, Array | None, Array],
    ffn: ExpertFFN,
    ragged: bool | None = None,
) -> Array:
    """``sum_k weight_k * expert_k(x)`` per token, each expert run where its weights live.

    ``expert_BxLxK`` holds each token's experts (``num_experts`` = dropped: not sent);
    ``weights`` = (up_ExDxF, gate_ExDxF or None, down_ExFxD). ``ragged``: use
    ``ragged_all_to_all`` (default: on TPU). Returns ``y_BxLxD`` in float32.
    """
    n_exp = weights[0].shape[0]
    ragged = current_platform() == "tpu" if ragged is None else ragged
    mesh = jax.sharding.get_abstract_mesh()
    axis = None if mesh.empty else _expert_axis(mesh)
    ep = 1 if axis is None else mesh.shape[axis]
    if n_exp % ep:
        raise ValueError(f"{n_exp} experts cannot be split over the {ep} devices of mesh.expert")
    local = functools.partial(_local_experts, ffn=ffn, n_exp=n_exp, axis=axis, ep=ep, ragged=ragged)
    batch, length = (
        (None, None) if mesh.empty else nn.logical_to_mesh_axes(("act_batch", "act_length"))
    )
    if mesh.empty or not _divides(x_BxLxD.shape[:2], (batch, length), mesh):
        # No mesh, or rows the mesh cannot split (init's and decoding's single row): every
        # expert here, partitioned by XLA. The same function of the inputs.
        whole = functools.partial(_local_experts, ffn=ffn, n_exp=n_exp, axis=None, ep=1,
                                  ragged=ragged)  # fmt: skip
        return whole(x_BxLxD, expert_BxLxK, weight_BxLxK, *weights)
    rows = PartitionSpec(batch, length, None)
    experts = PartitionSpec(axis, None, None)
    gate_spec = None if weights[1] is None else experts
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, rows, rows, experts, gate_spec, experts),
        out_specs=rows,
    )(x_BxLxD, expert_BxLxK, weight_BxLxK, *weights)


def _divides(sizes: tuple[int, ...], axes: tuple, mesh) -> bool:
    """Whether each size splits evenly over its mesh axis (or axes, or None)."""
    for size, names in zip(sizes, axes, strict=True):
        names = () if names is None else (names,) if isinstance(names, str) else names
        if size % math.prod(mesh.shape[n] for n in names):
            return False
    return True


def _expert_axis(mesh) -> str | None:
    """The mesh axis the rules put the ``expert`` dimension on (None: not split)."""
    axis = nn.logical_to_mesh_axes(("expert",))[0]
    if isinstance(axis, tuple):
        if len(axis) != 1:
            raise ValueError(f"MoE dispatch splits experts over one mesh axis, not {axis}")
        axis = axis[0]
    return axis if axis is not None and mesh.shape.get(axis, 1) > 1 else None


def _local_experts(x_BxLxD, expert_BxLxK, weight_BxLxK, up, gate, down, *, ffn, n_exp, axis,
                   ep, ragged):  # fmt: skip
    """One device: its pairs sorted by expert, exchanged, run, brought back and mixed."""
    d = x_BxLxD.shape[-1]
    k = expert_BxLxK.shape[-1]
    x_TxD = x_BxLxD.reshape(-1, d)
    key_N = expert_BxLxK.reshape(-1)  # n_exp marks a dropped pair
    order_N = jnp.argsort(key_N, stable=True)
    token_N = order_N // k
    counts_E = jnp.bincount(key_N, length=n_exp + 1)[:n_exp].astype(jnp.int32)
    x_NxD = x_TxD[token_N]
    if ep == 1:
        y_NxD = ffn(x_NxD, counts_E, up, gate, down)
    else:
        exchange = _RaggedExchange if ragged else _PaddedExchange
        y_NxD = exchange(counts_E, key_N[order_N], axis, ep).run(x_NxD, ffn, up, gate, down)
    w_N = weight_BxLxK.reshape(-1)[order_N].astype(jnp.float32)
    y_TxD = jnp.zeros((x_TxD.shape[0], d), jnp.float32)
    y_TxD = y_TxD.at[token_N].add(y_NxD.astype(jnp.float32) * w_N[:, None])
    return y_TxD.reshape(x_BxLxD.shape)


class _Exchange:
    """Who sends what to whom along the ``expert`` axis, from the per-expert counts."""

    def __init__(self, counts_E: Array, sorted_key_N: Array, axis: str, ep: int):
        n_exp = counts_E.shape[0]
        self.axis, self.ep, self.n_local = axis, ep, n_exp // ep
        self.n = sorted_key_N.shape[0]
        self.me = jax.lax.axis_index(axis)
        counts_SxE = jax.lax.all_gather(counts_E, axis)  # row s: what device s sends, per expert
        self.sends_SxJ = counts_SxE.reshape(ep, ep, self.n_local).sum(-1)
        self.send_J = self.sends_SxJ[self.me]
        self.recv_S = self.sends_SxJ[:, self.me]
        # rows device s sends me, per local expert
        self.local_SxL = jax.lax.dynamic_slice_in_dim(
            counts_SxE, self.me * self.n_local, self.n_local, axis=1
        )
        self.send_start_J = jnp.cumsum(self.send_J) - self.send_J
        # sorted pair i goes to peer dest_N[i], at position pos_N[i] of the block sent there
        self.dest_N = jnp.minimum(sorted_key_N // self.n_local, ep)  # ep: dropped
        start = jnp.concatenate([self.send_start_J, jnp.full((1,), self.n, jnp.int32)])
        self.pos_N = jnp.arange(self.n) - start[self.dest_N]

    def run(self, x_NxD: Array, ffn: ExpertFFN, up, gate, down) -> Array:
        recv_RxD, block_start_S = self.forward(x_NxD)
        local_R = self._local_expert_of_rows(recv_RxD.shape[0], block_start_S)
        order_R = jnp.argsort(local_R, stable=True)
        sizes_L = jnp.bincount(local_R, length=self.n_local + 1)[: self.n_local].astype(jnp.int32)
        # back in the compute dtype: the buffers of the reverse exchange are the size of the
        # worst case (every peer's every pair here), halved in bf16
        y_sorted_RxD = ffn(recv_RxD[order_R], sizes_L, up, gate, down).astype(recv_RxD.dtype)
        y_RxD = jnp.zeros_like(y_sorted_RxD).at[order_R].set(y_sorted_RxD)
        return self.backward(y_RxD)

    def _local_expert_of_rows(self, n_rows: int, block_start_S: Array) -> Array:
        """Each received row's local expert (``n_local`` for padding): block s starts at
        ``block_start_S[s]`` and holds ``recv_S[s]`` rows sorted by expert."""
        r = jnp.arange(n_rows)
        src_R = jnp.clip(jnp.searchsorted(block_start_S, r, side="right") - 1, 0, self.ep - 1)
        offset_R = r - block_start_S[src_R]
        ends_SxL = jnp.cumsum(self.local_SxL, axis=1)
        local_R = jnp.sum(offset_R[:, None] >= ends_SxL[src_R], axis=1)
        return jnp.where(offset_R < self.recv_S[src_R], local_R, self.n_local)


class _PaddedExchange(_Exchange):
    """The CPU twin: ``all_to_all`` of one block per peer, each padded to all N pairs."""

    def forward(self, x_NxD):
        d = x_NxD.shape[-1]
        buf_JxNxD = jnp.zeros((self.ep, self.n, d), x_NxD.dtype)
        buf_JxNxD = buf_JxNxD.at[self.dest_N, self.pos_N].set(x_NxD, mode="drop")
        recv_SxNxD = jax.lax.all_to_all(buf_JxNxD, self.axis, 0, 0)
        return recv_SxNxD.reshape(-1, d), jnp.arange(self.ep) * self.n

    def backward(self, y_RxD):
        back_JxNxD = jax.lax.all_to_all(y_RxD.reshape(self.ep, self.n, -1), self.axis, 0, 0)
        dest = jnp.minimum(self.dest_N, self.ep - 1)  # dropped pairs: any row, weight 0
        return back_JxNxD[dest, jnp.clip(self.pos_N, 0, self.n - 1)]


class _RaggedExchange(_Exchange):
    """TPU: ``ragged_all_to_all`` sends each peer exactly its rows, received back to back."""

    def forward(self, x_NxD):
        recv_start_S = jnp.cumsum(self.recv_S) - self.recv_S
        # where my block lands on peer j: after the blocks of the devices before me
        land_J = (jnp.cumsum(self.sends_SxJ, axis=0) - self.sends_SxJ)[self.me]
        out = jnp.zeros((self.ep * self.n, x_NxD.shape[-1]), x_NxD.dtype)
        recv_RxD = jax.lax.ragged_all_to_all(
            x_NxD, out, self.send_start_J, self.send_J, land_J, self.recv_S, axis_name=self.axis
        )
        self._recv_start_S = recv_start_S
        return recv_RxD, recv_start_S

    def backward(self, y_RxD):
        # peer s's rows return to where they started in its sorted pairs
        home_S = (jnp.cumsum(self.sends_SxJ, axis=1) - self.sends_SxJ)[:, self.me]
        out = jnp.zeros((self.n, y_RxD.shape[-1]), y_RxD.dtype)
        return jax.lax.ragged_all_to_all(
            y_RxD, out, self._recv_start_S, self.recv_S, home_S, self.send_J, axis_name=self.axis
        )
