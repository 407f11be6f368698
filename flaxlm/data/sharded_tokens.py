"""A token stream stored as several files, read as one 1-D array without loading it.

A prepared corpus (flaxlm/data/prepare.py) writes each shard's tokens to its own ``.npy``;
:class:`ShardedTokens` memory-maps them and answers what batches ask of a token array:
``len``, gathers at integer indices (``tokens[idx_N]``), slices (a view, nothing read) and
``np.asarray`` (reads the slice). Only the bytes of the rows asked for are read, so a host's
memory does not grow with the corpus, and ``reads`` counts the tokens each process read.

    tokens = ShardedTokens([np.load(p, mmap_mode="r") for p in shard_files])
    window = tokens[np.arange(1000, 1257)]  # may span two shards
    tokens.reads.tokens  # 257
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flaxlm.data.stored_arrays import open_tokens


@dataclass
class ReadCount:
    """Tokens read through a stream and its views (for tests and benchmarks)."""

    tokens: int = 0
    gathers: int = 0


class LazyShard:
    """A shard ``.npy`` memory-mapped (or, in a bucket, read by byte ranges) on first read, so
    that opening a corpus of many shards costs no file opens: its length and dtype come from
    the manifest."""

    def __init__(self, path: Path | str, n_tokens: int, dtype: np.dtype):
        self.path, self.n_tokens, self.dtype = path, n_tokens, np.dtype(dtype)
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n_tokens

    def __getitem__(self, index):
        if self._array is None:
            self._array = open_tokens(str(self.path))
            if self._array.shape != (self.n_tokens,) or self._array.dtype != self.dtype:
                raise ValueError(
                    f"{self.path} holds {self._array.shape} {self._array.dtype}, expected "
                    f"({self.n_tokens},) {self.dtype}; run flaxlm data verify"
                )
        return self._array[index]


class ShardedTokens:
    """The concatenation of 1-D token arrays (memory-mapped shards), or a window of it."""

    ndim = 1

    def __init__(
        self,
        shards: list[np.ndarray | LazyShard],
        start: int = 0,
        stop: int | None = None,
        reads: ReadCount | None = None,
        _bounds: np.ndarray | None = None,
    ):
        if not shards:
            raise ValueError("a sharded token stream needs at least one shard")
        self.shards = shards
        self.dtype = np.dtype(shards[0].dtype)
        if _bounds is None:
            _bounds = np.concatenate([[0], np.cumsum([len(s) for s in shards])]).astype(np.int64)
        self._bounds = _bounds  # (n_shards + 1,) first global index of each shard
        self.start = start
        self.stop = int(_bounds[-1]) if stop is None else stop
        self.reads = reads if reads is not None else ReadCount()

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, index):
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step == 1:
                hi = max(hi, lo)
                return ShardedTokens(
                    self.shards, self.start + lo, self.start + hi, self.reads, self._bounds
                )
            return self._gather(np.arange(lo, hi, step, dtype=np.int64))
        idx = np.asarray(index)
        if idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"sharded tokens take int indices or slices, not {idx.dtype}")
        out = self._gather(idx.astype(np.int64))
        return out[()] if out.ndim == 0 else out

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"token index out of range [0, {n}): [{idx.min()}, {idx.max()}]")
        where = np.where(idx < 0, idx + n, idx) + self.start
        shard = np.searchsorted(self._bounds, where, side="right") - 1
        out = np.empty(where.shape, dtype=self.dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.shards[s][where[sel] - self._bounds[s]]
        self.reads.tokens += int(idx.size)
        self.reads.gathers += 1
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Reads the window (all of it: meant for small windows, e.g. one document)."""
        parts = []
        first = max(int(np.searchsorted(self._bounds, self.start, side="right")) - 1, 0)
        for s in range(first, len(self.shards)):
            lo, hi = self._bounds[s], self._bounds[s + 1]
            if lo >= self.stop:
                break
            a, b = max(self.start, lo) - lo, min(self.stop, hi) - lo
            if b > a:
                parts.append(np.asarray(self.shards[s][a:b]))
        out = np.concatenate(parts) if parts else np.zeros(0, self.dtype)
        self.reads.tokens += len(out)
        return out if dtype is None else out.astype(dtype)
