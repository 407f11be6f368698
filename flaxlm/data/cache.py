"""The tokenize-once cache: sources → (tokenizer) → token ids + document offsets on disk.

    prepared = prepare_data(cfg.data, model_vocab_size=cfg.model.vocab_size)
    prepared.train.tokens      # (n_tokens,) uint16/uint32, memory-mapped
    prepared.train.doc_offsets # (n_docs + 1,) int64; document d is tokens[off[d]:off[d+1]]

Every document is encoded and followed by one ``</s>``. Documents go to the validation split
when a hash of their id falls below ``data.val_fraction``, so the split does not depend on the
order or number of other documents. The cache lives in ``<cache_dir>/<key>/``, where the key
hashes everything the tokens depend on (source paths, sizes and contents, the jsonl field, the
tokenizer or the settings to train one, val_fraction, the format version). It is built in a
temporary folder (``.build-<key>-<host>-<pid>-*``) and renamed into place, so a crash never
leaves a half cache, and processes that race to build it agree on one result. A build folder
left by a killed process is removed on the next start: at once when its process (same host)
is gone, after a day without writes when it was another host's.

With several sources (``data.sources``) the documents are written source after source, so each
source's documents are a contiguous range of each split: ``prepared.sources[i].train`` is a
zero-copy view. Weights are not part of the key: re-weighting a mixture reuses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flaxlm.config import ConfigError, DataConfig
from flaxlm.data.encode import encode_documents, token_dtype, train_tokenizer_on_documents
from flaxlm.data.sources import (
    DataError,
    Document,
    SourceSpec,
    SourceStats,
    iter_documents,
    list_source_files,
    resolve_sources,
)
from flaxlm.pids import pid_alive
from flaxlm.tokenizer import Tokenizer, check_vocab

FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Another host's build folder with no write for this long is taken for a killed build.
# Long: training a tokenizer on a large corpus writes nothing for a while.
STALE_BUILD_S = 24 * 3600


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
    first_doc: int = 0  # for a view of documents [first_doc, ...) of the stored split

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def doc_ids(self) -> list[str]:
        """The ids of this split's documents, in stream order."""
        if self.directory is None:
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
        )

    @classmethod
    def load(cls, directory: Path, name: str) -> TokenSplit:
        tokens = np.load(directory / f"{name}.tokens.npy", mmap_mode="r")
        offsets = np.load(directory / f"{name}.doc_offsets.npy")
        return cls(name, tokens, offsets, directory)


@dataclass
class SourceData:
    """One source's share of the prepared data: its documents in each split, and its weight."""

    name: str
    weight: float  # normalised: the weights of all sources sum to 1
    train: TokenSplit
    val: TokenSplit
    n_empty_docs: int = 0


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: TokenSplit  # every source's documents, in source order
    val: TokenSplit
    cache_dir: Path
    cache_hit: bool  # True when the cache existed and nothing was tokenized
    n_empty_docs: int  # empty / whitespace-only documents skipped
    seconds: float  # wall time of prepare_data
    sources: list[SourceData] = field(default_factory=list)  # in data.sources order
    # Per source name: a SHA-256 of its files' doc ids, sizes and contents (not their paths)
    fingerprints: dict[str, str] = field(default_factory=dict)

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
    if not data_cfg.paths and not data_cfg.sources:
        raise DataError(
            "data.paths and data.sources are empty; expected text files, folders, .jsonl, "
            ".parquet, dataset folders or tfds:NAME"
        )
    if model_vocab_size is not None and not data_cfg.tokenizer and tokenizer is None:
        # Fail before spending minutes on training a tokenizer the model cannot use.
        if data_cfg.tokenizer_vocab_size > model_vocab_size:
            raise ConfigError(
                f"data.tokenizer_vocab_size={data_cfg.tokenizer_vocab_size} exceeds "
                f"model.vocab_size={model_vocab_size}; expected tokenizer vocab <= model vocab"
            )
    given = tokenizer
    if given is None and data_cfg.tokenizer:
        given = Tokenizer.load(data_cfg.tokenizer, data_cfg.tokenizer_specials)
    if given is not None and model_vocab_size is not None:
        check_vocab(given, model_vocab_size)

    files = _sources_files(data_cfg)  # hashes every file once, for the key and fingerprints
    key = cache_key(data_cfg, given, files)
    root = Path(data_cfg.cache_dir)
    remove_stale_builds(root)
    final = root / key
    cache_hit = (final / "meta.json").is_file()
    if not cache_hit:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-{_HOST}-{os.getpid()}-", dir=root))
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
    train, val = TokenSplit.load(final, "train"), TokenSplit.load(final, "val")
    specs = resolve_sources(data_cfg)
    total_weight = sum(s.weight for s in specs)
    ranges = meta.get("sources") or [  # caches built before mixtures: one source
        {"train_docs": [0, train.n_docs], "val_docs": [0, val.n_docs], "n_empty_docs": 0}
    ]
    sources = [
        SourceData(
            spec.name,
            spec.weight / total_weight,
            train.documents(*r["train_docs"]),
            val.documents(*r["val_docs"]),
            r["n_empty_docs"],
        )
        for spec, r in zip(specs, ranges, strict=True)
    ]
    return PreparedData(
        tokenizer=tokenizer,
        train=train,
        val=val,
        cache_dir=final,
        cache_hit=cache_hit,
        n_empty_docs=meta["n_empty_docs"],
        seconds=time.perf_counter() - start,
        sources=sources,
        fingerprints={
            spec.name: _content_sha256(source_files)
            for spec, source_files in zip(specs, files, strict=True)
        },
    )


def cache_key(
    data_cfg: DataConfig, tokenizer: Tokenizer | None, files: list[list[dict]] | None = None
) -> str:
    """A hash of everything the cached tokens depend on (not seq_len: packing is done later).

    Not the mixture weights either: they only change which rows batches draw. ``files``: the
    sources' file fingerprints, if already computed.
    """
    files = _sources_files(data_cfg) if files is None else files
    if tokenizer is not None:
        tok = {"model_sha256": hashlib.sha256(tokenizer.model_bytes).hexdigest()}
    else:
        tok = {
            "train_type": data_cfg.tokenizer_type,
            "vocab_size": data_cfg.tokenizer_vocab_size,
            "byte_fallback": data_cfg.byte_fallback,
        }
        # Only when changed, so that caches built before these options keep their keys.
        if data_cfg.tokenizer_character_coverage != 1.0:
            tok["character_coverage"] = data_cfg.tokenizer_character_coverage
        if data_cfg.tokenizer_normalization != "identity":
            tok["normalization"] = data_cfg.tokenizer_normalization
    blob = {
        "format": FORMAT_VERSION,
        "sources": files[0],
        "jsonl_field": data_cfg.jsonl_field,
        "val_fraction": data_cfg.val_fraction,
        "tokenizer": tok,
    }
    if data_cfg.sources:
        blob["sources"] = [
            {"name": spec.name, "field": spec.field, "split": spec.split, "files": source_files}
            for spec, source_files in zip(resolve_sources(data_cfg), files, strict=True)
        ]
        del blob["jsonl_field"]  # each source names its field
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


def _source_documents(
    specs: list[SourceSpec], tfds_data_dir: str, stats: list[SourceStats] | None = None
) -> Iterator[tuple[int, Document]]:
    """(source index, document) for every non-empty document, source after source."""
    for s, spec in enumerate(specs):
        source_stats = stats[s] if stats is not None else None
        docs = iter_documents(
            spec.paths, spec.field, source_stats, split=spec.split, tfds_data_dir=tfds_data_dir
        )
        for doc in docs:
            yield s, doc


def _build(data_cfg: DataConfig, given: Tokenizer | None, out: Path, progress: bool) -> None:
    specs = resolve_sources(data_cfg)
    stats = [SourceStats() for _ in specs]
    sources_of_docs, doc_ids = [], []
    for s, doc in _source_documents(specs, data_cfg.tfds_data_dir, stats):
        sources_of_docs.append(s)
        doc_ids.append(doc.doc_id)
    is_val = assign_splits(doc_ids, data_cfg.val_fraction)

    def all_docs() -> Iterator[Document]:
        return (doc for _, doc in _source_documents(specs, data_cfg.tfds_data_dir))

    if given is None:
        train_docs = (d for i, d in enumerate(all_docs()) if not is_val[i])
        train_tokenizer_on_documents(
            train_docs,
            out / "tokenizer",
            data_cfg.tokenizer_vocab_size,
            model_type=data_cfg.tokenizer_type,
            byte_fallback=data_cfg.byte_fallback,
            character_coverage=data_cfg.tokenizer_character_coverage,
            normalization=data_cfg.tokenizer_normalization,
        )
        (out / "tokenizer.vocab").unlink()
        tokenizer = Tokenizer.load(out / "tokenizer.model")
    else:
        (out / "tokenizer.model").write_bytes(given.model_bytes)
        tokenizer = given

    dtype = token_dtype(tokenizer.vocab_size)
    writers = {name: _SplitWriter(out, name, dtype) for name in SPLITS}
    bar = tqdm(total=len(doc_ids), unit="doc", desc="tokenizing", disable=not progress)
    encoded = encode_documents(all_docs(), tokenizer)
    for i, (doc, ids) in enumerate(encoded):
        writers["val" if is_val[i] else "train"].add(doc.doc_id, ids)
        bar.update(1)
    bar.close()

    # Documents arrived source after source: each source is one range of each split.
    source_of_doc = np.asarray(sources_of_docs, dtype=np.int64)
    ranges = []
    for in_split in (~is_val, is_val):  # train, val
        ends = np.cumsum(np.bincount(source_of_doc[in_split], minlength=len(specs)))
        starts = np.concatenate([[0], ends[:-1]])
        ranges.append([[int(lo), int(hi)] for lo, hi in zip(starts, ends, strict=True)])
    sources_meta = [
        {
            "name": spec.name,
            "train_docs": ranges[0][s],
            "val_docs": ranges[1][s],
            "n_empty_docs": stats[s].n_empty,
        }
        for s, spec in enumerate(specs)
    ]

    meta = {
        "format": FORMAT_VERSION,
        "paths": [p for spec in specs for p in spec.paths],
        "jsonl_field": data_cfg.jsonl_field,
        "val_fraction": data_cfg.val_fraction,
        "tokenizer": data_cfg.tokenizer or "trained",
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "n_empty_docs": sum(st.n_empty for st in stats),
        "sources": sources_meta,
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


def remove_stale_builds(root: Path) -> list[Path]:
    """Removes the ``.build-*`` folders of ``root`` that no live process is writing: those of
    a process of this host that is gone, and any other with no write for ``STALE_BUILD_S``.
    Returns the removed folders."""
    if not root.is_dir():
        return []
    removed = []
    for folder in root.glob(".build-*"):
        owner = _BUILD_NAME.fullmatch(folder.name)
        if owner and owner["host"] == _HOST:
            stale = not pid_alive(int(owner["pid"]))
        else:  # another host's build, or one named before pids were
            stale = time.time() - _last_write(folder) > STALE_BUILD_S
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())
_BUILD_NAME = re.compile(r"\.build-[0-9a-f]+-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[a-z0-9_]+")


def _last_write(folder: Path) -> float:
    """The newest modification time of the folder and the files in it."""
    times = [folder.stat().st_mtime]
    for path in folder.rglob("*"):
        try:
            times.append(path.stat().st_mtime)
        except OSError:  # removed meanwhile
            continue
    return max(times)


def _sources_files(data_cfg: DataConfig) -> list[list[dict]]:
    """The file fingerprints of each source, in ``resolve_sources`` order."""
    return [
        _files_fingerprint(spec.paths, data_cfg.tfds_data_dir) for spec in resolve_sources(data_cfg)
    ]


def _content_sha256(files: list[dict]) -> str:
    """What a source's documents are, wherever its files live: doc ids, sizes, contents."""
    content = [{k: f[k] for k in ("doc_id", "size", "sha256")} for f in files]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _files_fingerprint(paths: Iterable[str], tfds_data_dir: str) -> list[dict]:
    return [
        {
            "path": str(f.path.resolve()),
            "doc_id": f.doc_id,
            "size": f.path.stat().st_size,
            "sha256": _file_sha256(f.path),
        }
        for f in list_source_files(paths, tfds_data_dir)
    ]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
