"""Sentence-pair examples for next-sentence prediction: ``[CLS] A [SEP] B [SEP]``.

A split's documents are cut into chunks of ``seq_len - 3`` tokens (the room A and B share);
example i is chunk i. Its generator ``default_rng([seed, PAIR_STREAM, g])`` (g = the global
example index) draws where A ends inside the chunk; then, with probability 1/2, B is the rest of
the chunk (the true continuation, label 0), else a span of the same length from a random
*other* document (label 1). Like masks, pairs are a pure function of (seed, g). A split of
one document (a tiny validation split) draws its random Bs from that document, at least one
chunk away from A.

    chunks = PairChunks(split, seq_len=128)
    rows = build_pairs(chunks, chunk_ids_N, global_ids_N, seed, cls_id, sep_id, pad_id)
    rows["inputs"], rows["token_types"], rows["segment_ids"], rows["nsp_labels"]
"""

from __future__ import annotations

import numpy as np

from flaxlm.data.token_split import TokenSplit

PAIR_STREAM = 0x70616972  # "pair"
RANDOM_NEXT_PROB = 0.5


class PairChunks:
    """The chunks of a split: ``starts``/``ends`` (token offsets) and ``docs`` per chunk.

    A document's content excludes its closing ``</s>``; its last chunk may be shorter, and
    chunks of fewer than 2 tokens (nothing to split into A and B) are dropped.
    """

    def __init__(self, split: TokenSplit, seq_len: int):
        if seq_len < 8:
            raise ValueError(f"seq_len={seq_len} is too short for [CLS] A [SEP] B [SEP] pairs")
        self.split = split
        self.seq_len = seq_len
        self.chunk_len = seq_len - 3
        offsets = np.asarray(split.doc_offsets, dtype=np.int64)
        self.doc_starts = offsets[:-1]
        self.doc_ends = offsets[1:] - 1  # without </s>
        starts, docs = [], []
        for d, (lo, hi) in enumerate(zip(self.doc_starts, self.doc_ends, strict=True)):
            s = np.arange(lo, hi - 1, self.chunk_len, dtype=np.int64)
            starts.append(s)
            docs.append(np.full(len(s), d, dtype=np.int64))
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.docs = np.concatenate(docs) if docs else np.zeros(0, np.int64)
        self.ends = np.minimum(self.starts + self.chunk_len, self.doc_ends[self.docs])
        if len(self.starts) == 0:
            raise ValueError(f"{split.name} split has no document of 2 or more tokens")

    def __len__(self) -> int:
        return len(self.starts)


def build_pairs(
    chunks: PairChunks,
    chunk_ids_N: np.ndarray,
    global_ids_N: np.ndarray,
    seed: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Builds one pair per chunk id.

    Returns (N, S) int32 ``inputs``, ``token_types`` (0 for [CLS] A [SEP], 1 for B [SEP], 0 on
    padding), ``segment_ids`` (1 on real tokens, 0 on padding: attention ignores padding),
    ``positions`` (0..len-1), and (N, 1) ``nsp_labels`` int32 (1 = B is random),
    ``nsp_weights`` float32 (1), ``random_doc`` int64 (the document B came from, -1 if none).
    """
    tokens = chunks.split.tokens
    n, seq_len = len(chunk_ids_N), chunks.seq_len
    n_docs = len(chunks.doc_starts)
    out = {
        "inputs": np.full((n, seq_len), pad_id, dtype=np.int32),
        "token_types": np.zeros((n, seq_len), dtype=np.int32),
        "segment_ids": np.zeros((n, seq_len), dtype=np.int32),
        "positions": np.zeros((n, seq_len), dtype=np.int32),
        "nsp_labels": np.zeros((n, 1), dtype=np.int32),
        "nsp_weights": np.ones((n, 1), dtype=np.float32),
        "random_doc": np.full((n, 1), -1, dtype=np.int64),
    }
    for row, (c, g) in enumerate(zip(chunk_ids_N, global_ids_N, strict=True)):
        rng = np.random.default_rng([seed, PAIR_STREAM, int(g)])
        start, end, doc = int(chunks.starts[c]), int(chunks.ends[c]), int(chunks.docs[c])
        a_end = start + int(rng.integers(1, end - start))  # A and B both non-empty
        a = np.asarray(tokens[start:a_end])
        b_len = end - a_end
        if rng.random() < RANDOM_NEXT_PROB:
            if n_docs > 1:
                other = int(rng.integers(0, n_docs - 1))
                other += other >= doc  # any document but this one
            else:
                other = doc
            lo, hi = int(chunks.doc_starts[other]), int(chunks.doc_ends[other])
            room = max(hi - lo - b_len, 0) + 1
            b_start = lo + int(rng.integers(0, room))
            if other == doc and abs(b_start - start) < 2 * chunks.chunk_len:
                b_start = lo + (b_start - lo + 4 * chunks.chunk_len) % room
            b = np.asarray(tokens[b_start : min(b_start + b_len, hi)])
            out["nsp_labels"][row, 0] = 1
            out["random_doc"][row, 0] = other
        else:
            b = np.asarray(tokens[a_end:end])
        pair = np.concatenate([[cls_id], a, [sep_id], b, [sep_id]]).astype(np.int32)
        length = len(pair)
        out["inputs"][row, :length] = pair
        out["token_types"][row, len(a) + 2 : length] = 1
        out["segment_ids"][row, :length] = 1
        out["positions"][row, :length] = np.arange(length, dtype=np.int32)
    return out
