"""``.npy`` arrays of a prepared corpus wherever it is stored: memory-mapped from a local disk,
read by byte ranges from a bucket, so a host reads only the tokens of its own rows either way.

    offsets = load_array(storage.join(root, "train.doc_offsets.npy"))
    tokens = open_tokens(storage.join(root, "u0", "train.tokens.npy"), n_tokens, dtype)
    tokens[np.arange(1000, 1257)]   # one range read on a bucket
"""

from __future__ import annotations

import io

import numpy as np

from flaxlm import storage

HEADER_BYTES = 256  # read first: an .npy header is 128 bytes unless its shape is huge
MERGE_GAP = 1 << 12  # indices this close share one range read


def load_array(url: str) -> np.ndarray:
    """A whole ``.npy``: memory-mapped when local, read at once from an object store."""
    if storage.is_posix(url):
        return np.load(url, mmap_mode="r")
    return np.load(io.BytesIO(storage.read_bytes(url)))


def open_tokens(url: str) -> np.ndarray | RangeReadArray:
    """A 1-D token ``.npy`` to gather from: memory-mapped when local, else by range reads."""
    if storage.is_posix(url):
        return np.load(url, mmap_mode="r")
    return RangeReadArray(url)


class RangeReadArray:
    """A 1-D ``.npy`` in a bucket that reads only the elements it is indexed with (a slice,
    or integer indices: runs of nearby indices share one range read)."""

    ndim = 1

    def __init__(self, url: str):
        self.url = url
        first = storage.read_bytes(url, 0, HEADER_BYTES)
        # magic (6) + version (2) + header length (2 bytes in format 1, 4 in 2 and 3)
        size = 10 + int.from_bytes(first[8:10], "little") if first[6] == 1 else None
        if size is None:
            size = 12 + int.from_bytes(first[8:12], "little")
        if size > len(first):
            first = storage.read_bytes(url, 0, size)
        head = io.BytesIO(first)
        version = np.lib.format.read_magic(head)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        self.shape, fortran, self.dtype = read_header(head)
        if len(self.shape) != 1 or fortran or self.dtype.hasobject:
            raise ValueError(f"{url} holds a {self.shape} array, expected a 1-D token array")
        self._offset = head.tell()

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, lo: int, hi: int) -> np.ndarray:
        size = self.dtype.itemsize
        data = storage.read_bytes(self.url, self._offset + lo * size, (hi - lo) * size)
        return np.frombuffer(data, self.dtype)

    def __getitem__(self, index):
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            return self._read(lo, max(hi, lo))[::step] if step > 0 else np.asarray(self)[index]
        idx = np.asarray(index, dtype=np.int64)
        flat = np.where(idx < 0, idx + len(self), idx).ravel()
        out = np.empty(flat.shape, self.dtype)
        if flat.size:
            order = np.argsort(flat, kind="stable")
            ordered = flat[order]
            breaks = np.flatnonzero(np.diff(ordered) > MERGE_GAP) + 1
            for run in np.split(np.arange(ordered.size), breaks):
                lo, hi = int(ordered[run[0]]), int(ordered[run[-1]]) + 1
                out[order[run]] = self._read(lo, hi)[ordered[run] - lo]
        return out.reshape(idx.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._read(0, len(self))
        return out if dtype is None else out.astype(dtype)
