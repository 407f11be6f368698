"""What the cached tokens depend on: the cache key, and the fingerprints of the sources' files.

A file's fingerprint is its path, doc id, size and SHA-256. The cache key
(:func:`cache_key`) hashes them with the tokenizer (or the settings to train one), the split
settings and :data:`FORMAT_VERSION`, so any change gets a cache folder of its own. A source's
content fingerprint (:func:`content_sha256`) leaves the paths out: a resume checks it, so
moving a corpus is not taken for changing it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from flaxlm.config import DataConfig
from flaxlm.data.sources import SourceSpec, list_source_files
from flaxlm.tokenizers.sentencepiece import Tokenizer

FORMAT_VERSION = 1  # of a cache folder (flaxlm/data/cache.py); a new one gets new keys


def cache_key(
    data_cfg: DataConfig,
    tokenizer: Tokenizer | None,
    specs: list[SourceSpec],
    files: list[list[dict]] | None = None,
) -> str:
    """A hash of everything the cached tokens depend on (not seq_len: packing is done later).

    Not the mixture weights either: they only change which rows batches draw. ``specs``: the
    sources as resolved once by the caller (``resolve_sources``); ``files``: their file
    fingerprints, if already computed.
    """
    files = sources_files(specs, data_cfg.tfds_data_dir) if files is None else files
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
    if data_cfg.doc_split != "none":  # only when set, so that older caches keep their keys
        blob["doc_split"] = data_cfg.doc_split
    if data_cfg.sources:
        blob["sources"] = [
            {"name": spec.name, "field": spec.field, "split": spec.split, "files": source_files}
            for spec, source_files in zip(specs, files, strict=True)
        ]
        del blob["jsonl_field"]  # each source names its field
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def sources_files(specs: list[SourceSpec], tfds_data_dir: str = "") -> list[list[dict]]:
    """The file fingerprints of each resolved source, in order."""
    return [_files_fingerprint(spec.paths, tfds_data_dir) for spec in specs]


def content_sha256(files: list[dict]) -> str:
    """What a source's documents are, wherever its files live: doc ids, sizes, contents."""
    content = [{k: f[k] for k in ("doc_id", "size", "sha256")} for f in files]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _files_fingerprint(paths: Iterable[str], tfds_data_dir: str) -> list[dict]:
    return [
        {
            "path": f.where,
            "doc_id": f.doc_id,
            "size": f.path.stat().st_size,
            "sha256": file_sha256(f.path),
        }
        for f in list_source_files(paths, tfds_data_dir)
    ]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
