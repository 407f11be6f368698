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
   expert FFN, flaxlm/models/moe_ffn.py: in row chunks when the buffer is large); padding
   rows belong to no group and are left alone.
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
    buffer_factor: float = 0.0,
) -> tuple[Array, Array]:
    """``sum_k weight_k * expert_k(x)`` per token, each expert run where its weights live.

    ``expert_BxLxK`` holds each token's experts (``num_experts`` = dropped: not sent);
    ``weights`` = (up_ExDxF, gate_ExDxF or None, down_ExFxD). ``ragged``: use
    ``ragged_all_to_all`` (default: on TPU). ``buffer_factor`` (``model.moe.buffer_factor``):
    0 sizes each device's receive buffer for the worst case (every pair of every peer: nothing
    dropped); f > 0 holds ``ceil(f * n)`` rows, n = the pairs a device sends (so 1 = perfect
    balance), and drops the pairs past it (the last peers' last experts first; their output
    is zero). Returns ``y_BxLxD`` in float32 and the number of pairs the buffers dropped.
    """
    if buffer_factor < 0:
        raise ValueError(f"model.moe.buffer_factor={buffer_factor} must be >= 0 (0: worst case)")
    n_exp = weights[0].shape[0]
    ragged = current_platform() == "tpu" if ragged is None else ragged
    mesh = jax.sharding.get_abstract_mesh()
    axis = None if mesh.empty else _expert_axis(mesh)
    ep = 1 if axis is None else mesh.shape[axis]
    if n_exp % ep:
        raise ValueError(f"{n_exp} experts cannot be split over the {ep} devices of mesh.expert")
    local = functools.partial(_local_experts, ffn=ffn, n_exp=n_exp, axis=axis, ep=ep,
                              ragged=ragged, buffer_factor=buffer_factor)  # fmt: skip
    batch, length = (
        (None, None) if mesh.empty else nn.logical_to_mesh_axes(("act_batch", "act_length"))
    )
    if mesh.empty or not _divides(x_BxLxD.shape[:2], (batch, length), mesh):
        # No mesh, or rows the mesh cannot split (init's and decoding's single row): every
        # expert here, partitioned by XLA. The same function of the inputs.
        whole = functools.partial(_local_experts, ffn=ffn, n_exp=n_exp, axis=None, ep=1,
                                  ragged=ragged, buffer_factor=0.0)  # fmt: skip
        y_BxLxD, dropped = whole(x_BxLxD, expert_BxLxK, weight_BxLxK, *weights)
        return y_BxLxD, jnp.sum(dropped)
    rows = PartitionSpec(batch, length, None)
    experts = PartitionSpec(axis, None, None)
    gate_spec = None if weights[1] is None else experts
    y_BxLxD, dropped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, rows, rows, experts, gate_spec, experts),
        out_specs=(rows, PartitionSpec(batch, length)),
    )(x_BxLxD, expert_BxLxK, weight_BxLxK, *weights)
    return y_BxLxD, jnp.sum(dropped)


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
                   ep, ragged, buffer_factor):  # fmt: skip
    """One device: its pairs sorted by expert, exchanged, run, brought back and mixed; and
    the pairs its receive buffer dropped, as a (1, 1) array."""
    d = x_BxLxD.shape[-1]
    k = expert_BxLxK.shape[-1]
    x_TxD = x_BxLxD.reshape(-1, d)
    key_N = expert_BxLxK.reshape(-1)  # n_exp marks a dropped pair
    order_N = jnp.argsort(key_N, stable=True)
    inverse_N = _inverse(order_N)
    counts_E = jnp.bincount(key_N, length=n_exp + 1)[:n_exp].astype(jnp.int32)
    x_NxD = _expand(x_TxD, order_N, inverse_N, k)
    dropped = jnp.zeros((1, 1), jnp.float32)
    if ep == 1:
        y_NxD = ffn(x_NxD, counts_E, up, gate, down)
    else:
        exchange_cls = _RaggedExchange if ragged else _PaddedExchange
        exchange = exchange_cls(counts_E, key_N[order_N], axis, ep, buffer_factor)
        y_NxD = exchange.run(x_NxD, ffn, up, gate, down)
        dropped = dropped + exchange.dropped
    # back in token order (pair t * k + j of token t): a gather, then the weighted sum
    y_TxKxD = permute(y_NxD, inverse_N, order_N).reshape(-1, k, d).astype(jnp.float32)
    w_TxK = weight_BxLxK.reshape(-1, k).astype(jnp.float32)
    y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD, w_TxK, preferred_element_type=jnp.float32)
    return y_TxD.reshape(x_BxLxD.shape), dropped


# --- row permutations as gathers both ways ---------------------------------------------------
# Autodiff of ``x[perm]`` is a scatter-add (XLA cannot know perm is a permutation), and
# XLA:TPU runs a bf16 scatter in 32-bit words: 2 x rows x d_model bytes per copy, several per
# MoE layer at pod scale (benchmarks/RESULTS.md, "Mixtral-8x7B"). Given the inverse
# permutation, the backward is a gather too.


def _inverse(perm_N: Array) -> Array:
    """The inverse permutation: ``inverse[perm[i]] = i``."""
    n = perm_N.shape[0]
    return jnp.zeros((n,), perm_N.dtype).at[perm_N].set(jnp.arange(n, dtype=perm_N.dtype))


@jax.custom_vjp
def permute(x_NxD: Array, perm_N: Array, inverse_N: Array) -> Array:
    """``x[perm]`` for a permutation ``perm`` whose inverse is ``inverse``."""
    return x_NxD[perm_N]


def _permute_fwd(x_NxD, perm_N, inverse_N):
    return x_NxD[perm_N], (perm_N, inverse_N)


def _permute_bwd(residuals, g_NxD):
    perm_N, inverse_N = residuals
    return g_NxD[inverse_N], None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _expand(x_TxD: Array, order_N: Array, inverse_N: Array, k: int) -> Array:
    """Token ``order[i] // k`` for sorted pair i: each token k times, in the pairs' order."""
    return x_TxD[order_N // k]


def _expand_fwd(x_TxD, order_N, inverse_N, k):
    return x_TxD[order_N // k], (order_N, inverse_N)


def _expand_bwd(k, residuals, g_NxD):
    order_N, inverse_N = residuals
    g_TxKxD = g_NxD[inverse_N].reshape(-1, k, g_NxD.shape[-1]).astype(jnp.float32)
    return jnp.sum(g_TxKxD, axis=1).astype(g_NxD.dtype), None, None


_expand.defvjp(_expand_fwd, _expand_bwd)


class _Exchange:
    """Who sends what to whom along the ``expert`` axis, from the per-expert counts.

    Each device receives into ``rows`` rows: the worst case (``ep * n``) or, with a buffer
    factor, ``ceil(factor * n)``. Peer s's block lands after those of peers 0..s-1; what would
    land past the buffer is not sent (``kept_SxJ``: the prefix of each block that fits)."""

    def __init__(self, counts_E: Array, sorted_key_N: Array, axis: str, ep: int, factor: float):
        n_exp = counts_E.shape[0]
        self.axis, self.ep, self.n_local = axis, ep, n_exp // ep
        self.n = sorted_key_N.shape[0]
        self.rows = self.n * ep if factor <= 0 else min(self.n * ep, math.ceil(factor * self.n))
        self.me = jax.lax.axis_index(axis)
        counts_SxE = jax.lax.all_gather(counts_E, axis)  # row s: what device s sends, per expert
        self.sends_SxJ = sends_SxJ = counts_SxE.reshape(ep, ep, self.n_local).sum(-1)
        land_SxJ = jnp.cumsum(sends_SxJ, axis=0) - sends_SxJ  # where s's block starts at j
        self.kept_SxJ = jnp.clip(self.rows - land_SxJ, 0, sends_SxJ)
        self.land_SxJ = jnp.minimum(land_SxJ, self.rows)
        send_J = sends_SxJ[self.me]
        self.keep_J = self.kept_SxJ[self.me]
        self.recv_S = self.kept_SxJ[:, self.me]
        self.dropped = jnp.sum(send_J - self.keep_J).astype(jnp.float32)
        # rows device s sends me, per local expert, cut to the kept prefix of its block
        local_SxL = jax.lax.dynamic_slice_in_dim(
            counts_SxE, self.me * self.n_local, self.n_local, axis=1
        )
        ends_SxL = jnp.minimum(jnp.cumsum(local_SxL, axis=1), self.recv_S[:, None])
        self.local_ends_SxL = ends_SxL
        # where each of my blocks starts in my sorted pairs
        self.send_start_J = jnp.cumsum(send_J) - send_J
        # sorted pair i goes to peer dest_N[i], at position pos_N[i] of the block sent there
        self.dest_N = jnp.minimum(sorted_key_N // self.n_local, ep)  # ep: dropped
        start = jnp.concatenate([self.send_start_J, jnp.full((1,), self.n, jnp.int32)])
        self.pos_N = jnp.arange(self.n) - start[self.dest_N]
        keep = jnp.concatenate([self.keep_J, jnp.zeros((1,), self.keep_J.dtype)])
        self.kept_N = self.pos_N < keep[self.dest_N]

    def run(self, x_NxD: Array, ffn: ExpertFFN, up, gate, down) -> Array:
        recv_RxD, block_start_S = self.forward(x_NxD)
        local_R = self._local_expert_of_rows(recv_RxD.shape[0], block_start_S)
        order_R = jnp.argsort(local_R, stable=True)
        inverse_R = _inverse(order_R)
        sizes_L = jnp.bincount(local_R, length=self.n_local + 1)[: self.n_local].astype(jnp.int32)
        # back in the compute dtype: the buffers of the reverse exchange are the size of the
        # receive buffer (the worst case: every peer's every pair here), halved in bf16
        y_sorted_RxD = ffn(permute(recv_RxD, order_R, inverse_R), sizes_L, up, gate, down)
        y_RxD = permute(y_sorted_RxD.astype(recv_RxD.dtype), inverse_R, order_R)
        return self.backward(y_RxD)

    def _local_expert_of_rows(self, n_rows: int, block_start_S: Array) -> Array:
        """Each received row's local expert (``n_local`` for padding): block s starts at
        ``block_start_S[s]`` and holds ``recv_S[s]`` rows sorted by expert."""
        r = jnp.arange(n_rows)
        src_R = jnp.clip(jnp.searchsorted(block_start_S, r, side="right") - 1, 0, self.ep - 1)
        offset_R = r - block_start_S[src_R]
        local_R = jnp.sum(offset_R[:, None] >= self.local_ends_SxL[src_R], axis=1)
        return jnp.where(offset_R < self.recv_S[src_R], local_R, self.n_local)


class _PaddedExchange(_Exchange):
    """The CPU twin: ``all_to_all`` of one block per peer, each padded to all N pairs (the
    rows past a block's kept prefix are padding, as the ragged path never sends them)."""

    def forward(self, x_NxD):
        d = x_NxD.shape[-1]
        buf_JxNxD = jnp.zeros((self.ep, self.n, d), x_NxD.dtype)
        dest = jnp.where(self.kept_N, self.dest_N, self.ep)  # ep: out of range, not written
        buf_JxNxD = buf_JxNxD.at[dest, self.pos_N].set(x_NxD, mode="drop")
        recv_SxNxD = jax.lax.all_to_all(buf_JxNxD, self.axis, 0, 0)
        return recv_SxNxD.reshape(-1, d), jnp.arange(self.ep) * self.n

    def backward(self, y_RxD):
        back_JxNxD = jax.lax.all_to_all(y_RxD.reshape(self.ep, self.n, -1), self.axis, 0, 0)
        dest = jnp.minimum(self.dest_N, self.ep - 1)  # dropped pairs: any row, then zero
        y_NxD = back_JxNxD[dest, jnp.clip(self.pos_N, 0, self.n - 1)]
        return jnp.where(self.kept_N[:, None], y_NxD, jnp.zeros((), y_NxD.dtype))


class _RaggedExchange(_Exchange):
    """TPU: ``ragged_all_to_all`` sends each peer exactly its kept rows, received back to
    back into a buffer of ``rows`` rows."""

    def forward(self, x_NxD):
        recv_start_S = self.land_SxJ[:, self.me]
        out = jnp.zeros((self.rows, x_NxD.shape[-1]), x_NxD.dtype)
        recv_RxD = jax.lax.ragged_all_to_all(
            x_NxD, out, self.send_start_J, self.keep_J, self.land_SxJ[self.me], self.recv_S,
            axis_name=self.axis,
        )  # fmt: skip
        self._recv_start_S = recv_start_S
        return recv_RxD, recv_start_S

    def backward(self, y_RxD):
        # peer s's rows return to where its block to me starts in its sorted pairs
        home_S = (jnp.cumsum(self.sends_SxJ, axis=1) - self.sends_SxJ)[:, self.me]
        out = jnp.zeros((self.n, y_RxD.shape[-1]), y_RxD.dtype)
        return jax.lax.ragged_all_to_all(
            y_RxD, out, self._recv_start_S, self.recv_S, home_S, self.keep_J, axis_name=self.axis
        )
