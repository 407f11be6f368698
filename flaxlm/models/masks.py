"""Which keys each query may see: :class:`Mask`, a description instead of a dense array.

Every mask flaxlm needs is "same segment AND (a causal rule)": packed documents carry
segment ids (padding is segment 0), a decoder is causal, an encoder is not, and the unified
objective's rows are prefix-LM (``prefix_len`` 0 = causal, >= L = bidirectional). The
accelerator kernels take exactly that — segment ids plus a static causal/full mask — and
never see a ``B x 1 x L x S`` array; the CPU path builds the dense mask with :meth:`dense`.

    mask = Mask.causal_segments(segment_ids_BxL)        # GPT training
    mask = Mask.segments(segment_ids_BxL)               # BERT (padding = its own segment)
    mask = Mask.prefix_lm(segment_ids_BxL, prefix_len_B) # unified objective
    mask = Mask.decode(new_segment_ids_BxL, cache_segment_ids_BxS, start)  # KV cache
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class Mask:
    """Query i may see key j iff ``q_segment_ids[i] == kv_segment_ids[j]`` and, when
    ``causal``, ``j <= query_offset + i`` — or, with ``prefix_len``, ``j < prefix_len``
    (per row: the bidirectional prefix of a prefix-LM row)."""

    q_segment_ids_BxL: Array
    kv_segment_ids_BxS: Array
    prefix_len_B: Array | None = None
    query_offset: Array | int = 0  # decode: the cache slot of the first new query
    causal: bool = struct.field(pytree_node=False, default=False)
    # Static (not a traced leaf), so that it survives nn.remat / nn.scan, which trace every
    # leaf, query_offset included: queries at an offset over a KV cache.
    decoding: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def causal_segments(cls, segment_ids_BxL: Array) -> Mask:
        """Causal AND same segment: what a packed decoder trains with."""
        return cls(segment_ids_BxL, segment_ids_BxL, causal=True)

    @classmethod
    def segments(cls, segment_ids_BxL: Array) -> Mask:
        """Bidirectional within each segment: an encoder."""
        return cls(segment_ids_BxL, segment_ids_BxL)

    @classmethod
    def prefix_lm(cls, segment_ids_BxL: Array, prefix_len_B: Array) -> Mask:
        """Per-row prefix LM: key j is visible to query i iff both are in the same segment
        and (j <= i or j < prefix_len). ``prefix_len`` 0 is causal, >= L bidirectional, so
        one mask serves a batch mixing MLM, causal and prefix-LM rows."""
        return cls(segment_ids_BxL, segment_ids_BxL, prefix_len_B, causal=True)

    @classmethod
    def decode(cls, segment_ids_BxL: Array, cache_segment_ids_BxS: Array, start: Array) -> Mask:
        """L new tokens at cache slots ``start..start+L-1`` over S slots: slot j is visible to
        new token t iff j <= start + t and both carry the same segment id (empty slots and
        padding have segment 0, so real tokens never see them)."""
        return cls(
            segment_ids_BxL, cache_segment_ids_BxS, query_offset=start, causal=True, decoding=True
        )

    @property
    def is_training_shape(self) -> bool:
        """Queries and keys are the same positions (no cache): what the kernels handle."""
        return not self.decoding and self.q_segment_ids_BxL.shape == self.kv_segment_ids_BxS.shape

    def dense(self) -> Array:
        """The ``B x 1 x L x S`` boolean mask (for the CPU path and the reference)."""
        same_BxLxS = self.q_segment_ids_BxL[:, :, None] == self.kv_segment_ids_BxS[:, None, :]
        if not self.causal:
            return same_BxLxS[:, None]
        length, slots = self.q_segment_ids_BxL.shape[1], self.kv_segment_ids_BxS.shape[1]
        query_L, key_S = jnp.arange(length) + self.query_offset, jnp.arange(slots)
        visible_BxLxS = (key_S[None, :] <= query_L[:, None])[None]
        if self.prefix_len_B is not None:
            visible_BxLxS = visible_BxLxS | (
                key_S[None, None, :] < self.prefix_len_B[:, None, None]
            )
        return (same_BxLxS & visible_BxLxS)[:, None]

    def split_prefix(self, sentinel: int = -1) -> tuple[Mask, Mask, Array]:
        """A prefix-LM mask as two kernel-friendly ones and the rule that picks between them:
        ``(causal, within_prefix, use_prefix_BxL)``. For a query before its row's prefix end
        the visible keys are exactly the prefix keys of its segment (bidirectional); for any
        later query they are exactly its causal ones. ``within_prefix`` gives the keys after
        the prefix end a ``sentinel`` segment, and so the queries after it too (their output
        is not used; this way no query is left without a visible key)."""
        assert self.prefix_len_B is not None and self.is_training_shape
        length = self.q_segment_ids_BxL.shape[1]
        in_prefix_BxL = jnp.arange(length)[None, :] < self.prefix_len_B[:, None]
        seg = jnp.where(in_prefix_BxL, self.q_segment_ids_BxL, sentinel)
        causal = Mask(self.q_segment_ids_BxL, self.kv_segment_ids_BxS, causal=True)
        return causal, Mask(seg, seg), in_prefix_BxL
