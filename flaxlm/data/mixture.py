"""Weighted mixtures of sources, still a pure function of (seed, step).

Rows are dealt in blocks of R = global_batch * P rows (P steps, R >= 4096). Within a block,
source s gets exactly ``n_s`` rows, the largest-remainder apportionment of ``R * w_s``, so
every source's share is exact to 1/R at each block boundary; which rows of the block are
whose is a permutation drawn from ``default_rng([seed, MIX_STREAM, block])``. The j-th row that
source s ever gets (``j = block * n_s + rank within the block``) is that source's example
``perm_{s,e}[j mod N_s]`` of its own epoch ``e = j div N_s``, exactly as
:class:`~flaxlm.data.causal.CausalBatches` walks one source; a small source is repeated
(more epochs) and a large one is visited once at most per its epoch. Jumping to any step costs
one permutation of R rows; each process builds only its own rows.

    batches = MixtureBatches(prepared.sources, seq_len=256, global_batch=32, seed=0)
    batch = batches.batch(step, jax.process_index(), jax.process_count())
    batch["source_ids"]  # (32 // process_count, 256) int32: the source of each row's tokens
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from flaxlm.data.cache import PreparedData, SourceData
from flaxlm.data.causal import BATCH_KEYS, CausalBatches, _process_rows, pack_examples

MIXTURE_BATCH_KEYS = (*BATCH_KEYS, "source_ids")
MIN_BLOCK_ROWS = 4096
MIX_STREAM = 0x6D6978  # separates the block permutations from every other seeded stream


def apportion(weights: Sequence[float], rows: int) -> np.ndarray:
    """(S,) int64 rows per source summing to ``rows``: largest remainder of ``rows * w``.

    Ties go to the lower index, so the result is the same everywhere.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not (w > 0).all():
        raise ValueError(f"weights {list(weights)} must be a non-empty list of positive numbers")
    exact = rows * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    short = rows - int(counts.sum())
    order = np.lexsort((np.arange(len(w)), -(exact - counts)))  # largest remainder first
    counts[order[:short]] += 1
    return counts


def source_seed(seed: int, name: str) -> int:
    """A per-source seed, stable under adding, removing or reordering other sources."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class MixtureBatches:
    """Step-indexed batches drawn from several sources by weight.

    Same interface as CausalBatches (``batch(step, process_index, process_count)``), plus a
    ``source_ids`` key (the index of each row's source, per token, so it shards like the other
    keys) unless ``emit_source_ids=False``.
    """

    def __init__(
        self,
        sources: Sequence[SourceData],
        seq_len: int,
        global_batch: int,
        seed: int,
        emit_source_ids: bool = True,
    ):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.names = [s.name for s in sources]
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.emit_source_ids = emit_source_ids
        self.weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights /= self.weights.sum()
        # Enough steps per block that the smallest weight still gets a few rows per block.
        min_rows = max(MIN_BLOCK_ROWS, math.ceil(20 / self.weights.min()))
        self.block_steps = -(-min_rows // global_batch)
        self.block_rows = self.block_steps * global_batch
        self.rows_per_block = apportion(self.weights, self.block_rows)
        self.per_source = []
        for s in sources:
            try:
                batches = CausalBatches(s.train, seq_len, 1, source_seed(seed, s.name))
            except ValueError as e:
                raise ValueError(f"source {s.name!r}: {e}") from None
            self.per_source.append(batches)
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def shares(self) -> np.ndarray:
        """(S,) each source's exact share of the rows of a block."""
        return self.rows_per_block / self.block_rows

    def block(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(R,) source of each row of block ``index``, (R,) that row's index within its source."""
        cached = self._blocks.get(index)
        if cached is not None:
            return cached
        S, R = len(self.names), self.block_rows
        labels = np.repeat(np.arange(S), self.rows_per_block)
        source_R = labels[np.random.default_rng([self.seed, MIX_STREAM, index]).permutation(R)]
        # Rank of each row among its source's rows in the block, in row order.
        order = np.argsort(source_R, kind="stable")
        firsts = np.concatenate([[0], np.cumsum(self.rows_per_block)[:-1]])
        rank_R = np.empty(R, dtype=np.int64)
        rank_R[order] = np.arange(R) - np.repeat(firsts, self.rows_per_block)
        within_R = index * self.rows_per_block[source_R] + rank_R
        self._blocks = {b: v for b, v in self._blocks.items() if b >= index - 1}
        self._blocks[index] = (source_R, within_R)
        return source_R, within_R

    def row_sources(self, global_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global row indices (step * B + row): (source index, row index within source)."""
        global_rows = np.asarray(global_rows, dtype=np.int64)
        block, offset = np.divmod(global_rows, self.block_rows)
        source, within = np.empty_like(global_rows), np.empty_like(global_rows)
        for b in np.unique(block):
            sel = block == b
            source_R, within_R = self.block(int(b))
            source[sel], within[sel] = source_R[offset[sel]], within_R[offset[sel]]
        return source, within

    def batch(
        self, step: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``step``: each array (B / P, S)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        rows = _process_rows(self.global_batch, process_index, process_count)
        source, within = self.row_sources(step * self.global_batch + rows)
        S = self.seq_len
        out = {k: np.zeros((len(rows), S), np.float32 if k == "loss_mask" else np.int32)
               for k in BATCH_KEYS}  # fmt: skip
        for s in np.unique(source):
            sel = source == s
            src = self.per_source[s]
            packed = pack_examples(
                src.split.tokens, src.split.doc_offsets, src.example_ids(within[sel]), S
            )
            for key in BATCH_KEYS:
                out[key][sel] = packed[key]
        if self.emit_source_ids:
            out["source_ids"] = np.repeat(source.astype(np.int32)[:, None], S, axis=1)
        return out

    def epochs_at(self, step: int) -> np.ndarray:
        """(S,) how many epochs of each source the first ``step`` steps consume."""
        rows = step * self.global_batch * self.shares
        return rows / np.array([b.n_examples for b in self.per_source])


def make_train_batches(
    prepared: PreparedData, seq_len: int, global_batch: int, seed: int
) -> CausalBatches | MixtureBatches:
    """The training batches a config asks for: one source -> CausalBatches (unchanged
    behaviour), several -> MixtureBatches (with ``source_ids``)."""
    if len(prepared.sources) <= 1:
        return CausalBatches(prepared.train, seq_len, global_batch, seed)
    return MixtureBatches(prepared.sources, seq_len, global_batch, seed)
