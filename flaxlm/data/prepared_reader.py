"""Training from a prepared corpus (``data.prepared``), and ``flaxlm data verify``.

Opening a corpus reads its manifest and ``stat``s each shard (its size must be the one
recorded): no token and no raw source is read, so start-up does not grow with the corpus, and
the raw text need not exist on the training hosts. Tokens stay on disk, memory-mapped
(:class:`~flaxlm.data.sharded_tokens.ShardedTokens`); document offsets too. Batches read only
the rows they hold, and the example order of every epoch is a Feistel permutation computed per
row (flaxlm/data/feistel.py), so a host's memory stays flat however large the corpus.
``verify_prepared`` is the full check: every shard's SHA-256, offsets, and the raw sources
against their fingerprints where they are reachable.

    data = load_prepared(cfg.data, model_vocab_size=cfg.model.vocab_size)
    data.train.tokens  # ShardedTokens over units/*/train.tokens.npy
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flaxlm import storage
from flaxlm.config import DataConfig
from flaxlm.data.corpus import SPLITS, PreparedData, SourceData
from flaxlm.data.documents import DataError
from flaxlm.data.sharded_tokens import LazyShard, ReadCount, ShardedTokens
from flaxlm.data.stored_arrays import load_array
from flaxlm.data.token_split import TokenSplit
from flaxlm.tokenizers.sentencepiece import Tokenizer, check_vocab

FORMAT = 1  # flaxlm/data/prepare.py PREPARED_FORMAT (not imported: prepare pulls in more)


def read_manifest(root: str | Path) -> dict:
    """The manifest of a prepared corpus; DataError when there is none or it is unreadable."""
    path = storage.join(str(root), "manifest.json")
    try:
        manifest = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise DataError(
            f"{root} holds no manifest.json: not a prepared corpus, or its prepare did not "
            "finish (rerun `flaxlm data prepare CONFIG --out DIR`: it resumes)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}); rerun flaxlm data prepare") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def load_prepared(
    data_cfg: DataConfig,
    model_vocab_size: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> PreparedData:
    """Opens ``data_cfg.prepared`` as the data a run trains on (see the module doc).

    ``tokenizer``: a checkpoint's own, which must be the corpus's. The mixture weights are
    those of ``data.sources`` when given (names must match the corpus's sources), else the
    ones the corpus was prepared with.
    """
    start = time.perf_counter()
    root = str(data_cfg.prepared)  # a folder, or a bucket URL (read by byte ranges)
    manifest = read_manifest(root)
    tok_path = storage.join(root, manifest["tokenizer"]["file"])
    corpus_tokenizer = Tokenizer.from_bytes(storage.read_bytes(tok_path), source=tok_path)
    if tokenizer is not None and tokenizer.model_bytes != corpus_tokenizer.model_bytes:
        raise DataError(
            f"data.prepared={root} was tokenized with another tokenizer than this run's "
            "checkpoint; expected the corpus the run was started on"
        )
    if data_cfg.tokenizer:
        given = Tokenizer.load(data_cfg.tokenizer, data_cfg.tokenizer_specials)
        if given.model_bytes != corpus_tokenizer.model_bytes:
            raise DataError(
                f"data.tokenizer={data_cfg.tokenizer!r} is not the tokenizer of "
                f"data.prepared={root}; leave data.tokenizer empty (the corpus has its own)"
            )
    if model_vocab_size is not None:
        check_vocab(corpus_tokenizer, model_vocab_size)
    _check_shard_sizes(root, manifest)

    reads = ReadCount()  # one count for every split and source of this corpus
    splits = {name: _split(root, manifest, name, None, reads) for name in SPLITS}
    weights = _weights(data_cfg, manifest, root)
    sources = []
    for s, info in enumerate(manifest["sources"]):
        if len(manifest["sources"]) == 1:
            train, val = splits["train"], splits["val"]
        else:
            train, val = (_split(root, manifest, name, s, reads) for name in SPLITS)
        sources.append(SourceData(info["name"], weights[s], train, val, info["n_empty_docs"]))
    return PreparedData(
        tokenizer=corpus_tokenizer,
        train=splits["train"],
        val=splits["val"],
        cache_dir=storage.native(root),
        cache_hit=True,
        n_empty_docs=sum(info["n_empty_docs"] for info in manifest["sources"]),
        seconds=time.perf_counter() - start,
        sources=sources,
        fingerprints={info["name"]: info["content_sha256"] for info in manifest["sources"]},
    )


def _weights(data_cfg: DataConfig, manifest: dict, root: str) -> list[float]:
    names = [info["name"] for info in manifest["sources"]]
    if not data_cfg.sources:
        raw = [info["weight"] for info in manifest["sources"]]
    else:
        from flaxlm.config import source_name

        asked = [source_name(s) for s in data_cfg.sources]
        if asked != names:
            raise DataError(
                f"data.sources {asked} do not match the sources of data.prepared={root} "
                f"{names}; expected the same names in the same order (weights may differ)"
            )
        raw = [float(s.weight) for s in data_cfg.sources]
    total = sum(raw)
    return [w / total for w in raw]


def _split(
    root: str, manifest: dict, name: str, source: int | None, reads: ReadCount
) -> TokenSplit:
    """One split of the corpus, or of one of its sources (``source``)."""
    units = [u for u in manifest["units"] if source is None or u["source"] == source]
    dtype = np.dtype(manifest["dtype"])
    shards = [
        LazyShard(storage.join(root, u["folder"], f"{name}.tokens.npy"), u[name]["n_tokens"], dtype)
        for u in units
        if u[name]["n_tokens"] > 0
    ]
    if not shards:  # a small source may have no validation document
        shards = [np.zeros(0, dtype)]
    suffix = "" if source is None else f".s{source}"
    offsets = load_array(storage.join(root, f"{name}{suffix}.doc_offsets.npy"))
    tokens = ShardedTokens(shards, reads=reads)
    if int(offsets[-1]) != len(tokens):
        raise DataError(
            f"{root}/{name}{suffix}.doc_offsets.npy ends at {int(offsets[-1])}, expected "
            f"{len(tokens)} tokens; run flaxlm data verify {root}"
        )
    counts = load_array(storage.join(root, f"{name}.counts.npy")) if source is None else None
    return TokenSplit(
        name,
        tokens,
        offsets,
        order="feistel",
        doc_id_files=tuple(storage.join(root, u["folder"], f"{name}.doc_ids.txt") for u in units),
        token_counts=None if counts is None else counts[0],
        first_token_counts=None if counts is None else counts[1],
    )


def _check_shard_sizes(root: str, manifest: dict) -> None:
    """Every shard exists with the size its token count implies (a stat per shard)."""
    for u in manifest["units"]:
        for name in SPLITS:
            path = storage.join(root, u["folder"], f"{name}.tokens.npy")
            found = storage.info(path)
            if found is None:
                raise DataError(f"{path} is missing; the prepared corpus is incomplete")
            size = found.size
            if size != u[name]["tokens_bytes"]:
                raise DataError(
                    f"{path} has {size} bytes, expected {u[name]['tokens_bytes']} "
                    f"({u[name]['n_tokens']} tokens); run flaxlm data verify {root}"
                )


def verify_prepared(root: str | Path, progress: bool = True) -> list[str]:
    """The full check of a prepared corpus; returns the problems found (empty: all good).

    Re-hashes every shard against the manifest, checks each unit's offsets, the joined
    offsets and counts, and re-hashes the raw source files that exist here (a source file
    that is not reachable is reported as such, not as a problem).
    """
    root = str(root)  # a folder or a bucket URL
    manifest = read_manifest(root)
    problems: list[str] = []
    total = sum(u[n]["n_tokens"] for u in manifest["units"] for n in SPLITS)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="verifying", disable=not progress)
    for u in manifest["units"]:
        folder = storage.join(root, u["folder"])
        for name in SPLITS:
            path = storage.join(folder, f"{name}.tokens.npy")
            if storage.info(path) is None:
                problems.append(f"{path}: missing")
                continue
            if storage.sha256(path) != u[name]["tokens_sha256"]:
                problems.append(f"{path}: SHA-256 differs from the manifest (corrupted)")
            offsets = np.asarray(load_array(storage.join(folder, f"{name}.doc_offsets.npy")))
            n = u[name]["n_tokens"]
            if len(offsets) != u[name]["n_docs"] + 1 or offsets[0] != 0 or offsets[-1] != n:
                problems.append(f"{folder}/{name}.doc_offsets.npy: does not span {n} tokens")
            elif (np.diff(offsets) <= 0).any():
                problems.append(f"{folder}/{name}.doc_offsets.npy: not increasing")
            bar.update(n)
        for f in u["files"]:
            path, found = f["path"], storage.info(f["path"])
            if found is None:
                continue  # the raw text need not live where the corpus is verified
            if found.size != f["size"] or storage.sha256(path) != f["sha256"]:
                problems.append(f"{path}: the source changed since it was prepared")
    bar.close()
    for name in SPLITS:
        joined = load_array(storage.join(root, f"{name}.doc_offsets.npy"))
        expect = manifest["splits"][name]
        if len(joined) != expect["n_docs"] + 1 or int(joined[-1]) != expect["n_tokens"]:
            problems.append(f"{root}/{name}.doc_offsets.npy: does not match the manifest")
        counts = load_array(storage.join(root, f"{name}.counts.npy"))
        if int(counts[0].sum()) != expect["n_tokens"] or int(counts[1].sum()) != expect["n_docs"]:
            problems.append(f"{root}/{name}.counts.npy: does not match the manifest")
    tok = storage.read_bytes(storage.join(root, manifest["tokenizer"]["file"]))
    if hashlib.sha256(tok).hexdigest() != manifest["tokenizer"]["sha256"]:
        problems.append(f"{root}/{manifest['tokenizer']['file']}: SHA-256 differs")
    return problems
