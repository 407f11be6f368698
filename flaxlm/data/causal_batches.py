"""Packed causal-LM examples and step-indexed batches.

A split's tokens form one stream, cut into windows of ``seq_len + 1`` tokens that overlap by one:
example i is ``stream[i*S : i*S + S + 1]``, inputs its first S tokens, targets its last S.
Windows span document boundaries; ``segment_ids`` and ``positions`` tell attention where each
document starts, and ``loss_mask`` is 0 where the target lies in another document than the
input (the model never predicts across documents).

The batch of step k is a pure function of (seed, k): global example g = k*B + row is example
``perm_e[g % n]`` of epoch ``e = g // n``, with ``perm_e`` drawn from ``default_rng([seed, e])``.
Resuming is "start at step k"; there is no iterator state.

    batches = CausalBatches(prepared.train, seq_len=256, global_batch=32, seed=0)
    batch = batches.batch(step, jax.process_index(), jax.process_count())
    batch["inputs"].shape  # (32 // process_count, 256)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.feistel import FeistelPermutation
from flaxlm.data.token_split import TokenSplit

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def n_causal_examples(n_tokens: int, seq_len: int) -> int:
    """How many full windows the stream holds (each needs S + 1 tokens, overlapping by one)."""
    return max(0, (n_tokens - 1) // seq_len)


def pack_examples(
    tokens: np.ndarray, doc_offsets: np.ndarray, example_ids: np.ndarray, seq_len: int
) -> dict[str, np.ndarray]:
    """Builds packed examples from a token stream.

    Args:
      tokens: (n_tokens,) the split's stream.
      doc_offsets: (n_docs + 1,) int64 document starts, ending with n_tokens.
      example_ids: (N,) which windows to build; window i starts at token i * seq_len.
      seq_len: S.
    Returns:
      inputs, targets, segment_ids, positions: (N, S) int32; loss_mask: (N, S) float32.
      segment_ids count documents within a row from 1; positions restart at 0 in each segment.
    """
    S = seq_len
    ids_N = np.asarray(example_ids, dtype=np.int64)
    window_NxS1 = ids_N[:, None] * S + np.arange(S + 1, dtype=np.int64)[None, :]
    tok_NxS1 = np.asarray(tokens[window_NxS1.ravel()]).reshape(window_NxS1.shape).astype(np.int32)
    # Which document each token belongs to: the last document start at or before it.
    doc_NxS1 = np.searchsorted(doc_offsets, window_NxS1, side="right") - 1
    doc_NxS = doc_NxS1[:, :-1]

    segment_NxS = (doc_NxS - doc_NxS[:, :1] + 1).astype(np.int32)
    # A segment starts where the row starts or where the document changes.
    col_S = np.arange(S, dtype=np.int64)
    is_start_NxS = np.ones_like(doc_NxS, dtype=bool)
    is_start_NxS[:, 1:] = doc_NxS[:, 1:] != doc_NxS[:, :-1]
    start_col_NxS = np.maximum.accumulate(np.where(is_start_NxS, col_S[None, :], 0), axis=1)
    return {
        "inputs": tok_NxS1[:, :-1],
        "targets": tok_NxS1[:, 1:],
        "segment_ids": segment_NxS,
        "positions": (col_S[None, :] - start_col_NxS).astype(np.int32),
        "loss_mask": (doc_NxS1[:, 1:] == doc_NxS).astype(np.float32),
    }


class EpochOrder:
    """The example order of a step-indexed dataset: global example ``g`` (``step * B + row``)
    is example ``perm_e[g % N]`` of epoch ``e = g // N``, ``perm_e`` seeded by ``(seed, e)``.
    Subclasses set ``n_examples``, ``seed``, ``shuffle`` and an empty ``_perms`` dict."""

    n_examples: int
    seed: int
    shuffle: bool
    _perms: dict[int, np.ndarray]
    # "table": a stored permutation per epoch (O(N) memory); "feistel": computed per example
    # in O(1) memory (flaxlm/data/feistel.py), what prepared corpora (data.prepared) use.
    order: str = "table"

    def permutation(self, epoch: int) -> np.ndarray:
        """(n_examples,) the example order of ``epoch``; the last two epochs are cached."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)
            # A batch may straddle two epochs; keep both, drop older ones.
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def example_ids(self, global_ids: np.ndarray) -> np.ndarray:
        """Maps global example indices (step * B + row) to example indices of the split."""
        global_ids = np.asarray(global_ids, dtype=np.int64)
        if not self.shuffle:
            return global_ids % self.n_examples
        epoch, within = np.divmod(global_ids, self.n_examples)
        out = np.empty_like(global_ids)
        for e in np.unique(epoch):
            sel = epoch == e
            if self.order == "feistel":
                out[sel] = FeistelPermutation(self.n_examples, (self.seed, int(e)))(within[sel])
            else:
                out[sel] = self.permutation(int(e))[within[sel]]
        return out


class CausalBatches(EpochOrder):
    """Step-indexed batches of packed causal examples from one split.

    ``batch(k)`` returns the same bytes for the same (split, seq_len, global_batch, seed, k)
    in any process and any call order. With ``shuffle=False`` examples come in stream order.
    """

    def __init__(
        self,
        split: TokenSplit,
        seq_len: int,
        global_batch: int,
        seed: int,
        shuffle: bool = True,
        ramp: BatchRamp | None = None,
    ):
        if seq_len <= 0 or global_batch <= 0:
            raise ValueError(f"seq_len={seq_len} and global_batch={global_batch} must be > 0")
        self.split = split
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.ramp = BatchRamp.or_constant(ramp, global_batch)  # train.batch_ramp
        self.seed = seed
        self.shuffle = shuffle
        self.order = split.order
        self.n_examples = n_causal_examples(split.n_tokens, seq_len)
        if self.n_examples == 0:
            raise ValueError(
                f"{split.name} split has {split.n_tokens} tokens, too few for one example of "
                f"seq_len={seq_len} (needs {seq_len + 1}); use more data or a shorter data.seq_len"
            )
        self._perms: dict[int, np.ndarray] = {}

    def batch(
        self, step: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``step``: each array (B / P, S).

        Process p gets rows [p * B/P, (p+1) * B/P) of the global batch, so concatenating the
        processes' batches in process order gives the global batch. Batch ``step`` holds
        global rows ``[ramp.offset(step), ... + B)`` with ``B = ramp.size(step)``
        (flaxlm/data/batch_ramp.py); without a ramp ``step * global_batch + row``.
        """
        global_ids = ramp_rows(self.ramp, step, process_index, process_count)
        return pack_examples(
            self.split.tokens, self.split.doc_offsets, self.example_ids(global_ids), self.seq_len
        )

    def eval_batches(
        self,
        batch_size: int,
        max_batches: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Walks the split in stream order, ``batch_size`` examples at a time (0 = no limit).

        The last batch is padded with rows of zeros whose loss_mask and segment_ids are 0, so
        every batch has shape (batch_size / process_count, S) and one compiled eval step serves.
        """

        def build(rows: np.ndarray) -> dict[str, np.ndarray]:
            return pack_examples(self.split.tokens, self.split.doc_offsets, rows, self.seq_len)

        return padded_eval_batches(
            build, self.n_examples, batch_size, max_batches, process_index, process_count
        )


def padded_eval_batches(
    build: Callable[[np.ndarray], dict[str, np.ndarray]],
    n_examples: int,
    batch_size: int,
    max_batches: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Examples ``0 .. n_examples`` in order, ``batch_size`` a batch (at most ``max_batches``;
    0 = all), this process's rows of each built by ``build(example ids)``. The last batch's
    missing rows are zeros (so their loss masks, weights and segment ids are 0): every batch
    has one shape, and one compiled eval step serves them all."""
    n_batches = -(-n_examples // batch_size)
    if max_batches > 0:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        rows = b * batch_size + _process_rows(batch_size, process_index, process_count)
        real = rows < n_examples
        built = build(rows[real])
        if not real.all():
            for key, value in built.items():
                full = np.zeros((len(rows),) + value.shape[1:], dtype=value.dtype)
                full[real] = value
                built[key] = full
        yield built


def ramp_rows(ramp: BatchRamp, step: int, process_index: int, process_count: int) -> np.ndarray:
    """This process's global row indices of batch ``step`` (data position) under ``ramp``."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    return ramp.offset(step) + _process_rows(ramp.size(step), process_index, process_count)


def _process_rows(batch: int, process_index: int, process_count: int) -> np.ndarray:
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    if batch % process_count:
        raise ValueError(f"batch size {batch} is not divisible by process_count={process_count}")
    per = batch // process_count
    return np.arange(process_index * per, (process_index + 1) * per, dtype=np.int64)
