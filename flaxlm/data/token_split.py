"""One split's token stream, and its files: ``<name>.tokens.npy``, ``<name>.doc_offsets.npy``
and ``<name>.doc_ids.txt`` in a cache folder.

    split = TokenSplit.load(cache_folder, "train")
    split.tokens[split.doc_offsets[d] : split.doc_offsets[d + 1]]  # document d, ending in </s>

:class:`SplitWriter` writes those files while the documents stream in (the tokenize-once cache,
flaxlm/data/cache.py, builds with it); :func:`tokenize_documents` makes a split in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flaxlm import storage
from flaxlm.data.encode import encode_documents, token_dtype
from flaxlm.data.sources import iter_documents
from flaxlm.tokenizers.sentencepiece import Tokenizer


@dataclass
class TokenSplit:
    """One split's token stream.

    tokens: (n_tokens,) uint16 (vocab <= 65536) or uint32, memory-mapped from disk.
    doc_offsets: (n_docs + 1,) int64, doc_offsets[0] == 0 and doc_offsets[-1] == n_tokens;
        each document's span ends with its ``</s>`` token.
    """

    name: str
    tokens: np.ndarray  # or a ShardedTokens (prepared corpora: flaxlm/data/sharded_tokens.py)
    doc_offsets: np.ndarray
    directory: Path | None = None  # where doc ids are stored; None for in-memory splits
    doc_id_list: list[str] | None = None  # the doc ids of an in-memory split
    first_doc: int = 0  # for a view of documents [first_doc, ...) of the stored split
    order: str = "table"  # the example order batches use (flaxlm/data/causal_batches.py EpochOrder)
    doc_id_files: tuple[Path | str, ...] = ()  # a prepared split's doc ids, one file per shard
    # Precomputed (vocab,) counts of every token / of each document's first token, so that
    # baselines need not read a large split (prepared corpora store them).
    token_counts: np.ndarray | None = None
    first_token_counts: np.ndarray | None = None

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def doc_ids(self) -> list[str]:
        """The ids of this split's documents, in stream order."""
        if self.doc_id_files:
            texts = (storage.read_text(str(f)) for f in self.doc_id_files)  # a folder or a bucket
            ids = [i for text in texts for i in text.split("\n")[:-1]]
        elif self.directory is None:
            ids = list(self.doc_id_list or [])
        else:
            text = (self.directory / f"{self.name}.doc_ids.txt").read_text(encoding="utf-8")
            ids = text.split("\n")[:-1]
        return ids[self.first_doc : self.first_doc + self.n_docs]

    def documents(self, lo: int, hi: int) -> TokenSplit:
        """Documents [lo, hi) as a split of their own: a view, nothing is copied."""
        if not 0 <= lo <= hi <= self.n_docs:
            raise ValueError(f"document range [{lo}, {hi}) is outside [0, {self.n_docs}]")
        start, stop = int(self.doc_offsets[lo]), int(self.doc_offsets[hi])
        return TokenSplit(
            self.name,
            self.tokens[start:stop],
            self.doc_offsets[lo : hi + 1] - start,
            self.directory,
            self.doc_id_list,
            self.first_doc + lo,
            self.order,
            self.doc_id_files,
        )

    def unigram_counts(self, vocab_size: int, predicted_only: bool = False) -> np.ndarray:
        """(vocab_size,) int64 counts of the split's tokens; ``predicted_only``: without each
        document's first token (a causal model never predicts it). Stored counts are used
        when the split has them, so a large prepared split is not read."""
        if self.token_counts is not None and self.first_token_counts is not None:
            counts = self.token_counts.astype(np.int64)
            if predicted_only:
                counts = counts - self.first_token_counts
        else:
            tokens = np.asarray(self.tokens)
            if predicted_only:
                keep = np.ones(len(tokens), dtype=bool)
                keep[self.doc_offsets[:-1]] = False
                tokens = tokens[keep]
            counts = np.bincount(tokens, minlength=vocab_size).astype(np.int64)
        if counts.size > vocab_size:
            top = counts.size - 1
            raise ValueError(f"{self.name} tokens reach id {top}, expected < {vocab_size}")
        return counts

    @classmethod
    def load(cls, directory: Path, name: str) -> TokenSplit:
        tokens = np.load(directory / f"{name}.tokens.npy", mmap_mode="r")
        offsets = np.load(directory / f"{name}.doc_offsets.npy")
        return cls(name, tokens, offsets, directory)


class SplitWriter:
    """Streams one split's tokens to disk, so memory stays flat however large the corpus."""

    def __init__(self, out: Path, name: str, dtype: type):
        self.out, self.name, self.dtype = out, name, np.dtype(dtype)
        self.raw_path = out / f"{name}.tokens.raw"
        self.raw = open(self.raw_path, "wb")  # closed in finish()
        self.offsets = [0]
        self.ids_file = open(out / f"{name}.doc_ids.txt", "w", encoding="utf-8")

    def add(self, doc_id: str, ids: list[int]) -> None:
        self.raw.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.ids_file.write(doc_id.replace("\n", " ") + "\n")

    def finish(self) -> dict[str, int]:
        self.raw.close()
        self.ids_file.close()
        n = self.offsets[-1]
        # Copy the raw stream into an .npy in chunks (np.load can then memory-map it).
        dst = np.lib.format.open_memmap(
            self.out / f"{self.name}.tokens.npy", mode="w+", dtype=self.dtype, shape=(n,)
        )
        if n:  # an empty raw file cannot be memory-mapped (a shard with no val documents)
            src = np.memmap(self.raw_path, dtype=self.dtype, mode="r", shape=(n,))
            chunk = 1 << 24
            for lo in range(0, n, chunk):
                dst[lo : lo + chunk] = src[lo : lo + chunk]
            del src
        dst.flush()
        del dst
        self.raw_path.unlink()
        np.save(self.out / f"{self.name}.doc_offsets.npy", np.asarray(self.offsets, np.int64))
        return {"n_docs": len(self.offsets) - 1, "n_tokens": n}


def tokenize_documents(
    paths: list[str], jsonl_field: str, tokenizer: Tokenizer, name: str = "eval"
) -> TokenSplit:
    """All documents of the sources as one in-memory split (no cache, no train/val split).

    For evaluating a trained model on other text through its own tokenizer.
    """
    ids_per_doc, doc_ids = [], []
    for doc, ids in encode_documents(iter_documents(paths, jsonl_field), tokenizer):
        ids_per_doc.append(np.asarray(ids, dtype=token_dtype(tokenizer.vocab_size)))
        doc_ids.append(doc.doc_id)
    offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in ids_per_doc])]).astype(np.int64)
    return TokenSplit(name, np.concatenate(ids_per_doc), offsets, None, doc_ids)
