"""The tokenize-once cache: sources → (tokenizer) → token ids + document offsets on disk.

    prepared = prepare_data(cfg.data, model_vocab_size=cfg.model.vocab_size)
    prepared.train.tokens      # (n_tokens,) uint16/uint32, memory-mapped
    prepared.train.doc_offsets # (n_docs + 1,) int64; document d is tokens[off[d]:off[d+1]]

Every document is encoded and followed by one ``</s>``. Documents go to the validation split
when a hash of their id falls below ``data.val_fraction``, so the split does not depend on the
order or number of other documents. The cache lives in ``<cache_dir>/<key>/``, where the key
hashes everything the tokens depend on (source paths, sizes and contents, the jsonl field, the
tokenizer or the settings to train one, val_fraction, the format version). It is built in a
temporary folder and renamed into place, so a crash never leaves a half cache, and processes
that race to build it agree on one result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flaxlm.config import ConfigError, DataConfig
from flaxlm.data.sources import (
    DataError,
    Document,
    SourceStats,
    iter_documents,
    list_source_files,
)
from flaxlm.tokenizer import Tokenizer, check_vocab, train_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Characters per encode_batch call: enough to keep sentencepiece's threads busy.
ENCODE_BATCH_CHARS = 4_000_000


@dataclass
class TokenSplit:
    """One split's token stream.

    tokens: (n_tokens,) uint16 (vocab <= 65536) or uint32, memory-mapped from disk.
    doc_offsets: (n_docs + 1,) int64, doc_offsets[0] == 0 and doc_offsets[-1] == n_tokens;
        each document's span ends with its ``</s>`` token.
    """

    name: str
    tokens: np.ndarray
    doc_offsets: np.ndarray
    directory: Path | None = None  # where doc ids are stored; None for in-memory splits
    doc_id_list: list[str] | None = None  # the doc ids of an in-memory split

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def doc_ids(self) -> list[str]:
        """The ids of this split's documents, in stream order."""
        if self.directory is None:
            return list(self.doc_id_list or [])
        text = (self.directory / f"{self.name}.doc_ids.txt").read_text(encoding="utf-8")
        return text.split("\n")[:-1]

    @classmethod
    def load(cls, directory: Path, name: str) -> TokenSplit:
        tokens = np.load(directory / f"{name}.tokens.npy", mmap_mode="r")
        offsets = np.load(directory / f"{name}.doc_offsets.npy")
        return cls(name, tokens, offsets, directory)


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: TokenSplit
    val: TokenSplit
    cache_dir: Path
    cache_hit: bool  # True when the cache existed and nothing was tokenized
    n_empty_docs: int  # empty / whitespace-only documents skipped
    seconds: float  # wall time of prepare_data

    def summary(self) -> str:
        """One line for the log."""
        how = "cached" if self.cache_hit else "built"
        return (
            f"data {how} in {self.seconds:.1f}s at {self.cache_dir}: "
            f"train {self.train.n_docs} docs / {self.train.n_tokens:,} tokens, "
            f"val {self.val.n_docs} docs / {self.val.n_tokens:,} tokens, "
            f"vocab {self.tokenizer.vocab_size}, {self.n_empty_docs} empty docs skipped"
        )


def prepare_data(
    data_cfg: DataConfig,
    model_vocab_size: int | None = None,
    progress: bool = True,
    tokenizer: Tokenizer | None = None,
) -> PreparedData:
    """Tokenizes the sources once (or reuses the cache) and returns both splits.

    Uses ``tokenizer`` if given (e.g. the one stored in a checkpoint), else the model file
    ``data_cfg.tokenizer``, else trains one on the train split. Raises
    ConfigError when ``model_vocab_size`` cannot hold the tokenizer's ids, DataError for
    unusable sources.
    """
    start = time.perf_counter()
    if not data_cfg.paths:
        raise DataError("data.paths is empty; expected text files, folders or .jsonl files")
    if model_vocab_size is not None and not data_cfg.tokenizer and tokenizer is None:
        # Fail before spending minutes on training a tokenizer the model cannot use.
        if data_cfg.tokenizer_vocab_size > model_vocab_size:
            raise ConfigError(
                f"data.tokenizer_vocab_size={data_cfg.tokenizer_vocab_size} exceeds "
                f"model.vocab_size={model_vocab_size}; expected tokenizer vocab <= model vocab"
            )
    given = tokenizer
    if given is None and data_cfg.tokenizer:
        given = Tokenizer.load(data_cfg.tokenizer)
    if given is not None and model_vocab_size is not None:
        check_vocab(given, model_vocab_size)

    key = cache_key(data_cfg, given)
    root = Path(data_cfg.cache_dir)
    final = root / key
    cache_hit = (final / "meta.json").is_file()
    if not cache_hit:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
        try:
            _build(data_cfg, given, tmp, progress)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "meta.json").is_file():
                    raise
                shutil.rmtree(tmp)  # another process finished first; its cache is identical
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    meta = json.loads((final / "meta.json").read_text())
    tokenizer = Tokenizer.load(final / "tokenizer.model")
    if model_vocab_size is not None:
        check_vocab(tokenizer, model_vocab_size)
    return PreparedData(
        tokenizer=tokenizer,
        train=TokenSplit.load(final, "train"),
        val=TokenSplit.load(final, "val"),
        cache_dir=final,
        cache_hit=cache_hit,
        n_empty_docs=meta["n_empty_docs"],
        seconds=time.perf_counter() - start,
    )


def cache_key(data_cfg: DataConfig, tokenizer: Tokenizer | None) -> str:
    """A hash of everything the cached tokens depend on (not seq_len: packing is done later)."""
    sources = [
        {
            "path": str(f.path.resolve()),
            "doc_id": f.doc_id,
            "size": f.path.stat().st_size,
            "sha256": _file_sha256(f.path),
        }
        for f in list_source_files(data_cfg.paths)
    ]
    if tokenizer is not None:
        tok = {"model_sha256": hashlib.sha256(tokenizer.model_bytes).hexdigest()}
    else:
        tok = {
            "train_type": data_cfg.tokenizer_type,
            "vocab_size": data_cfg.tokenizer_vocab_size,
            "byte_fallback": data_cfg.byte_fallback,
        }
    blob = {
        "format": FORMAT_VERSION,
        "sources": sources,
        "jsonl_field": data_cfg.jsonl_field,
        "val_fraction": data_cfg.val_fraction,
        "tokenizer": tok,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def doc_hash_fraction(doc_id: str) -> float:
    """A stable number in [0, 1) per document id (sha256, unlike Python's salted hash())."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(doc_ids: list[str], val_fraction: float) -> np.ndarray:
    """(n_docs,) bool, True = validation. Each split gets at least one document."""
    if len(doc_ids) < 2:
        raise DataError(
            f"found {len(doc_ids)} non-empty document(s); need >= 2 to hold out a validation split"
        )
    frac = np.array([doc_hash_fraction(d) for d in doc_ids])
    is_val = frac < val_fraction
    if not is_val.any():
        is_val[np.argmin(frac)] = True
    if is_val.all():
        is_val[np.argmax(frac)] = False
    return is_val


def encode_documents(
    docs: Iterable[Document], tokenizer: Tokenizer
) -> Iterator[tuple[Document, list[int]]]:
    """Yields (document, its token ids followed by ``</s>``), encoding many documents per call."""
    pending: list[Document] = []
    n_chars = 0
    for doc in docs:
        pending.append(doc)
        n_chars += len(doc.text)
        if n_chars >= ENCODE_BATCH_CHARS:
            yield from _encode_pending(pending, tokenizer)
            pending, n_chars = [], 0
    yield from _encode_pending(pending, tokenizer)


def _encode_pending(
    pending: list[Document], tokenizer: Tokenizer
) -> Iterator[tuple[Document, list[int]]]:
    if not pending:
        return
    encoded = tokenizer.encode_batch([doc.text for doc in pending])
    for doc, ids in zip(pending, encoded, strict=True):
        ids.append(tokenizer.eos_id)
        yield doc, ids


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


def train_tokenizer_on_documents(
    docs: Iterable[Document],
    model_prefix: Path,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
) -> Path:
    """Trains a tokenizer on documents (from any source, jsonl included); returns the .model."""
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    # sentencepiece reads sentences from files, one per line.
    with tempfile.TemporaryDirectory(prefix=".text-", dir=model_prefix.parent) as tmp:
        text_file = Path(tmp) / "text.txt"
        with open(text_file, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(doc.text + "\n")
        return train_tokenizer(
            [text_file],
            model_prefix,
            vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
        )


def token_dtype(vocab_size: int) -> type:
    """uint16 while every id fits (ids < 65536), else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _build(data_cfg: DataConfig, given: Tokenizer | None, out: Path, progress: bool) -> None:
    paths, field = data_cfg.paths, data_cfg.jsonl_field
    stats = SourceStats()
    doc_ids = [doc.doc_id for doc in iter_documents(paths, field, stats)]
    is_val = assign_splits(doc_ids, data_cfg.val_fraction)

    if given is None:
        train_docs = (d for i, d in enumerate(iter_documents(paths, field)) if not is_val[i])
        train_tokenizer_on_documents(
            train_docs,
            out / "tokenizer",
            data_cfg.tokenizer_vocab_size,
            model_type=data_cfg.tokenizer_type,
            byte_fallback=data_cfg.byte_fallback,
        )
        (out / "tokenizer.vocab").unlink()
        tokenizer = Tokenizer.load(out / "tokenizer.model")
    else:
        (out / "tokenizer.model").write_bytes(given.model_bytes)
        tokenizer = given

    dtype = token_dtype(tokenizer.vocab_size)
    writers = {name: _SplitWriter(out, name, dtype) for name in SPLITS}
    bar = tqdm(total=len(doc_ids), unit="doc", desc="tokenizing", disable=not progress)
    encoded = encode_documents(iter_documents(paths, field), tokenizer)
    for i, (doc, ids) in enumerate(encoded):
        writers["val" if is_val[i] else "train"].add(doc.doc_id, ids)
        bar.update(1)
    bar.close()

    meta = {
        "format": FORMAT_VERSION,
        "paths": list(paths),
        "jsonl_field": field,
        "val_fraction": data_cfg.val_fraction,
        "tokenizer": data_cfg.tokenizer or "trained",
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "n_empty_docs": stats.n_empty,
        **{name: w.finish() for name, w in writers.items()},
    }
    # meta.json is written last: its presence marks a complete cache.
    (out / "meta.json").write_text(json.dumps(meta, indent=2))


class _SplitWriter:
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
        src = np.memmap(self.raw_path, dtype=self.dtype, mode="r", shape=(n,))
        chunk = 1 << 24
        for lo in range(0, n, chunk):
            dst[lo : lo + chunk] = src[lo : lo + chunk]
        dst.flush()
        del dst, src
        self.raw_path.unlink()
        np.save(self.out / f"{self.name}.doc_offsets.npy", np.asarray(self.offsets, np.int64))
        return {"n_docs": len(self.offsets) - 1, "n_tokens": n}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
