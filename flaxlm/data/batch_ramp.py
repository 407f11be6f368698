"""Batch-size ramp-up (``train.batch_ramp``): the global batch size of each data position.

Large GPT runs start with a small batch and grow it in steps to the full one over the first
tokens. ``train.batch_ramp: [[0, 8], [200, 16], [400, 32]]`` means data positions 0..199 hold
8 rows, 200..399 16 rows, and 400 on 32 (the last size must be ``train.batch_size``). A data
position is what the loop's ``data_index`` counts: in a run without rollbacks, step ``k``
trains data position ``k - 1``, so ``[200, 16]`` reads "after 200 steps, batches of 16".

The batch size is a function of the data position, not of the optimizer step, so the rows stay
one partition of the example stream: data position ``d`` holds global rows
``[offset(d), offset(d) + size(d))`` of the same example order a constant batch walks, and
``offset(d)`` is a closed-form sum over the ramp's entries (O(#entries)). With no ramp,
``offset(d) = d * B`` exactly: the rows of every existing run. A rollback that skips data
positions skips their rows; resuming is "start at data position d", as before.

    ramp = BatchRamp.from_config(cfg.train)
    first, rows = ramp.offset(d), ramp.size(d)    # global rows of data position d

A training run builds its ramp once (flaxlm/train/loop.py) and hands that one object to the
family's batch maker (``family.train_batches(prepared, cfg, ramp)``), the LR schedule
(flaxlm/train/program.py) and the reporter, so the rows, the schedule's token clock and the
logged batch size cannot disagree; ``flaxlm data inspect`` builds one the same way.

This module sits at the bottom with the config (the data, the optimizer and the loop all read
it) and imports no flaxlm module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class BatchRamp:
    """Global batch size by data position: a step function that starts at data position 0.

    Args:
      entries: ``[(start, size), ...]`` with ``start`` strictly increasing from 0; position
        ``d`` has the size of the last entry whose start is <= d. Empty = ``full`` throughout.
      full: the full batch (``train.batch_size``): no entry may exceed it and the last must
        equal it.
    """

    def __init__(self, entries: Sequence[Sequence[int]], full: int):
        if full <= 0:
            raise ValueError(f"full batch size {full} must be > 0")
        pairs = [(int(s), int(b)) for s, b in entries] or [(0, full)]
        if pairs[0][0] != 0:
            raise ValueError(f"batch ramp {pairs} must start at data position 0")
        for (s0, _), (s1, _) in zip(pairs, pairs[1:], strict=False):
            if s1 <= s0:
                raise ValueError(f"batch ramp starts {s0}, {s1} must be strictly increasing")
        if any(not 0 < b <= full for _, b in pairs) or pairs[-1][1] != full:
            raise ValueError(
                f"batch ramp sizes {[b for _, b in pairs]} must be in [1, {full}] and end at {full}"
            )
        self.full = full
        self.starts_K = np.array([s for s, _ in pairs], dtype=np.int64)
        self.sizes_K = np.array([b for _, b in pairs], dtype=np.int64)
        # Rows before each entry's start: the sum of the earlier entries' rows.
        spans_K = np.diff(self.starts_K)
        self.offsets_K = np.concatenate([[0], np.cumsum(spans_K * self.sizes_K[:-1])]).astype(
            np.int64
        )

    @classmethod
    def from_config(cls, train_cfg: Any) -> BatchRamp:
        """The ramp of a :class:`flaxlm.config.TrainConfig` (``batch_ramp``, ``batch_size``)."""
        return cls(getattr(train_cfg, "batch_ramp", []) or [], train_cfg.batch_size)

    @classmethod
    def constant(cls, batch: int) -> BatchRamp:
        return cls([], batch)

    @classmethod
    def or_constant(cls, ramp: BatchRamp | None, global_batch: int) -> BatchRamp:
        """``ramp`` (the run's, handed down), or a constant one of ``global_batch`` rows when
        None. A ramp whose full batch is not ``global_batch`` raises: the batches would not
        be the rows its schedule and meter count."""
        if ramp is None:
            return cls.constant(global_batch)
        if ramp.full != global_batch:
            raise ValueError(
                f"batch ramp ends at {ramp.full} rows but global_batch={global_batch}; "
                "expected the ramp's full batch"
            )
        return ramp

    @property
    def ramped(self) -> bool:
        """Whether any data position holds fewer rows than the full batch."""
        return len(self.sizes_K) > 1

    def sizes(self) -> tuple[int, ...]:
        """The distinct batch sizes, ascending: one compiled train step each."""
        return tuple(int(b) for b in np.unique(self.sizes_K))

    def _entry(self, position: int) -> int:
        if position < 0:
            raise ValueError(f"data position {position} must be >= 0")
        return int(np.searchsorted(self.starts_K, position, side="right")) - 1

    def size(self, position: int) -> int:
        """Rows of global batch ``position``."""
        return int(self.sizes_K[self._entry(position)])

    def offset(self, position: int) -> int:
        """Global rows before batch ``position``: the sum of the sizes of positions < it."""
        k = self._entry(position)
        return int(self.offsets_K[k] + (position - self.starts_K[k]) * self.sizes_K[k])

    def global_rows(self, position: int) -> np.ndarray:
        """(size(position),) int64 global row indices of batch ``position``."""
        return self.offset(position) + np.arange(self.size(position), dtype=np.int64)

    def tokens_before(self, position: int, seq_len: int) -> int:
        """Training tokens in the batches before ``position`` (rows x seq_len)."""
        return self.offset(position) * seq_len

    def full_batches(self, step: Any, xp: Any = np) -> Any:
        """``offset(step) / full``: how many full batches of rows come before ``step``, as a
        float; with ``xp=jax.numpy`` it runs traced (the LR schedule in tokens,
        flaxlm/train/optim.py). Equals ``step`` without a ramp."""
        step = xp.asarray(step)
        k = xp.searchsorted(xp.asarray(self.starts_K), step, side="right") - 1
        starts = xp.asarray(self.starts_K.astype(np.float32))[k]
        sizes = xp.asarray(self.sizes_K.astype(np.float32))[k]
        offsets = xp.asarray(self.offsets_K.astype(np.float32))[k]
        return (offsets + (step.astype(np.float32) - starts) * sizes) / np.float32(self.full)

    def describe(self, seq_len: int) -> list[dict[str, int]]:
        """Each entry with the tokens trained before it: ``[{position, batch_size, tokens}]``."""
        return [
            {"position": int(s), "batch_size": int(b), "tokens": int(o) * seq_len}
            for s, b, o in zip(self.starts_K, self.sizes_K, self.offsets_K, strict=True)
        ]
