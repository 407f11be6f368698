"""The tokenize-once cache: sources → (tokenizer) → token ids + document offsets on disk.

    prepared = prepare_data(cfg.data, model_vocab_size=cfg.model.vocab_size)
    prepared.train.tokens      # (n_tokens,) uint16/uint32, memory-mapped
    prepared.train.doc_offsets # (n_docs + 1,) int64; document d is tokens[off[d]:off[d+1]]

Every document is encoded and followed by one ``</s>``. Documents go to the validation split
when a hash of their id falls below ``data.val_fraction``, so the split does not depend on the
order or number of other documents. The cache lives in ``<cache_dir>/<key>/``, where the key
hashes everything the tokens depend on (source paths, sizes and contents, the jsonl field, the
tokenizer or the settings to train one, val_fraction, the format version:
flaxlm/data/fingerprints.py). It is built in a temporary folder (``.build-<key>-<host>-<pid>-*``)
and renamed into place, so a crash never leaves a half cache, and processes that race to build
it agree on one result; a build folder left by a killed process is removed on the next start
(flaxlm/data/build_folders.py). A ``cache_dir`` in a bucket is shared by all hosts: a host
fetches a complete cache (``meta.json`` written last) into :func:`flaxlm.storage.local_cache`,
or builds it there and publishes it. Each split's files are read and written by
flaxlm/data/token_split.py.

With several sources (``data.sources``) the documents are written source after source, so each
source's documents are a contiguous range of each split: ``prepared.sources[i].train`` is a
zero-copy view. Weights are not part of the key: re-weighting a mixture reuses the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flaxlm import storage
from flaxlm.config import ConfigError, DataConfig
from flaxlm.data.build_folders import build_atomically, remove_stale_builds
from flaxlm.data.corpus import SPLITS, PreparedData, SourceData
from flaxlm.data.documents import auto_split, split_document
from flaxlm.data.encode import encode_documents, token_dtype, train_tokenizer_on_documents
from flaxlm.data.fingerprints import FORMAT_VERSION, cache_key, content_sha256, sources_files
from flaxlm.data.sources import (
    DataError,
    Document,
    SourceSpec,
    SourceStats,
    iter_documents,
    resolve_sources,
)
from flaxlm.data.token_split import SplitWriter, TokenSplit
from flaxlm.tokenizers.sentencepiece import Tokenizer, check_vocab


def prepare_data(
    data_cfg: DataConfig,
    model_vocab_size: int | None = None,
    progress: bool = True,
    tokenizer: Tokenizer | None = None,
    sources: list[SourceSpec] | None = None,
) -> PreparedData:
    """Tokenizes the sources once (or reuses the cache) and returns both splits.

    Uses ``tokenizer`` if given (e.g. the one stored in a checkpoint), else the model file
    ``data_cfg.tokenizer``, else trains one on the train split. ``sources``: ``data_cfg``'s
    sources if the caller has resolved them already (``resolve_sources``); else they are
    resolved here, once, and handed to everything below. Raises ConfigError when
    ``model_vocab_size`` cannot hold the tokenizer's ids, DataError for unusable sources.
    """
    if data_cfg.prepared:  # a corpus written by `flaxlm data prepare` (prepared_reader.py)
        from flaxlm.data.prepared_reader import load_prepared

        return load_prepared(data_cfg, model_vocab_size, tokenizer)
    start = time.perf_counter()
    if not data_cfg.paths and not data_cfg.sources:
        raise DataError(
            "data.paths and data.sources are empty; expected text files, folders, .jsonl, "
            ".parquet, dataset folders or tfds:NAME"
        )
    specs = resolve_sources(data_cfg) if sources is None else sources
    given = _given_tokenizer(data_cfg, model_vocab_size, tokenizer)
    files = sources_files(specs, data_cfg.tfds_data_dir)  # each file hashed once
    key = cache_key(data_cfg, given, specs, files)
    # A cache_dir in a bucket is shared by every host: each keeps a local copy to map.
    root = storage.local_cache(data_cfg.cache_dir)  # the folder itself when local
    shared = None if storage.is_posix(data_cfg.cache_dir) else storage.join(data_cfg.cache_dir, key)
    remove_stale_builds(root)
    final = root / key
    cache_hit = (final / "meta.json").is_file()
    if not cache_hit and shared is not None:
        root.mkdir(parents=True, exist_ok=True)
        cache_hit = storage.fetch_sealed(shared, final, "meta.json")
    if not cache_hit:
        build = functools.partial(_build, data_cfg, specs, given, progress=progress)
        build_atomically(final, build, "meta.json")
        if shared is not None:
            storage.publish(final, shared, "meta.json")
    prepared = _open_cache(final, specs, model_vocab_size)
    prepared.cache_hit = cache_hit
    prepared.seconds = time.perf_counter() - start
    prepared.fingerprints = {
        spec.name: content_sha256(source_files)
        for spec, source_files in zip(specs, files, strict=True)
    }
    return prepared


def _given_tokenizer(
    data_cfg: DataConfig, model_vocab_size: int | None, tokenizer: Tokenizer | None
) -> Tokenizer | None:
    """The tokenizer to encode with (``tokenizer``, else ``data.tokenizer``), or None to train
    one; checked against the model's vocabulary before any work is spent."""
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
    return given


def _open_cache(final: Path, specs: list[SourceSpec], model_vocab_size: int | None) -> PreparedData:
    """The complete cache folder ``final`` as PreparedData, split per source (timing and
    fingerprints are the caller's to fill in)."""
    meta = json.loads((final / "meta.json").read_text())
    tokenizer = Tokenizer.load(final / "tokenizer.model")
    if model_vocab_size is not None:
        check_vocab(tokenizer, model_vocab_size)
    train, val = TokenSplit.load(final, "train"), TokenSplit.load(final, "val")
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
        cache_hit=True,
        n_empty_docs=meta["n_empty_docs"],
        seconds=0.0,
        sources=sources,
    )


def doc_hash_fraction(doc_id: str) -> float:
    """A stable number in [0, 1) per document id (sha256, unlike Python's salted hash())."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(doc_ids: list[str], val_fraction: float) -> np.ndarray:
    """(n_docs,) bool, True = validation. Each split gets at least one document."""
    if len(doc_ids) < 2:
        raise DataError(
            f"found {len(doc_ids)} non-empty document(s); need >= 2 to hold out a validation "
            "split (one big file? cut it with data.doc_split=blank_lines, lines or chars:N)"
        )
    frac = np.array([doc_hash_fraction(d) for d in doc_ids])
    is_val = frac < val_fraction
    if not is_val.any():
        is_val[np.argmin(frac)] = True
    if is_val.all():
        is_val[np.argmax(frac)] = False
    return is_val


def _source_documents(
    specs: list[SourceSpec],
    tfds_data_dir: str,
    stats: list[SourceStats] | None = None,
    doc_split: str = "none",
) -> Iterator[tuple[int, Document]]:
    """(source index, document) for every non-empty document, source after source, each cut
    by ``data.doc_split`` (flaxlm/data/documents.py)."""
    for s, spec in enumerate(specs):
        source_stats = stats[s] if stats is not None else None
        docs = iter_documents(
            spec.paths, spec.field, source_stats, split=spec.split, tfds_data_dir=tfds_data_dir
        )
        for doc in docs:
            for piece in split_document(doc, doc_split):
                if piece.text.strip():
                    yield s, piece
                elif source_stats is not None:
                    source_stats.n_empty += 1


def _list_documents(
    data_cfg: DataConfig, specs: list[SourceSpec]
) -> tuple[list[SourceStats], str, list[int], list[str]]:
    """(per-source stats, the doc split used, each document's source, each document's id).
    A corpus of one document (one big ``input.txt``) under ``data.doc_split=none`` is cut
    by :func:`auto_split` instead, and a line says so: it could not be split otherwise."""
    split, tfds_dir = data_cfg.doc_split, data_cfg.tfds_data_dir
    while True:  # a second round only for a one-document corpus
        stats = [SourceStats() for _ in specs]
        sources_of_docs, doc_ids, first = [], [], None
        for s, doc in _source_documents(specs, tfds_dir, stats, split):
            sources_of_docs.append(s)
            doc_ids.append(doc.doc_id)
            first = doc if first is None else first
        if len(doc_ids) != 1 or split != "none":
            return stats, split, sources_of_docs, doc_ids
        split = auto_split(first)
        print(f"data: one document ({first.doc_id}); cut with data.doc_split={split} "
              "(set data.doc_split to choose)")  # fmt: skip


def _build(
    data_cfg: DataConfig,
    specs: list[SourceSpec],
    given: Tokenizer | None,
    out: Path,
    progress: bool,
) -> None:
    stats, split, sources_of_docs, doc_ids = _list_documents(data_cfg, specs)
    is_val = assign_splits(doc_ids, data_cfg.val_fraction)

    def all_docs() -> Iterator[Document]:
        return (doc for _, doc in _source_documents(specs, data_cfg.tfds_data_dir, None, split))

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
    writers = {name: SplitWriter(out, name, dtype) for name in SPLITS}
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
