"""``flaxlm data prepare``: tokenize the sources once, in parallel, into a prepared corpus.

    flaxlm data prepare configs/gpt_demo.yaml --out /shared/corpus     # then, to train:
    flaxlm train configs/gpt_demo.yaml data.prepared=/shared/corpus

The sources are cut into *units* (one per source file; a TFDS or HF dataset is one unit).
Worker processes tokenize units independently, each into its own folder, so the work spreads
over every core and an interrupted prepare redoes only the units it had not finished (one
unit's work: flaxlm/data/prepare_worker.py):

    OUT/plan.json                 what is prepared (written first; a rerun must match it)
    OUT/tokenizer.model           the tokenizer (given by data.tokenizer, or trained first)
    OUT/units/u000042/            one unit, renamed into place when complete:
        train.tokens.npy          its train documents' tokens, each closed by </s>
        train.doc_offsets.npy     (n_docs + 1,) int64, from 0
        train.doc_ids.txt         one id per line
        train.counts.npy          (2, vocab) int64: every token, each document's first token
        val.*                     the same for its validation documents
        unit.json                 counts, file sizes/mtimes/SHA-256 of its sources and tokens
    OUT/{train,val}.doc_offsets.npy   the whole split's offsets (memory-mapped when training)
    OUT/{train,val}.s<i>.doc_offsets.npy   per source, when there are several
    OUT/manifest.json             written last: its presence marks a complete corpus

An ``--out`` in a bucket prepares into a local folder under ``$FLAXLM_CACHE`` and then
copies it up, ``manifest.json`` last (a rerun continues from the local folder).

Documents go to the validation split by the same hash of their id as in the tokenize-once
cache (flaxlm/data/cache.py), and units are concatenated in source and file order, so with
the same tokenizer a prepared corpus holds exactly the cache's token streams. Reading it:
flaxlm/data/prepared_reader.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flaxlm import storage
from flaxlm.config import Config, ConfigError
from flaxlm.data.cache import SPLITS, doc_hash_fraction
from flaxlm.data.documents import DataError, Document, split_document
from flaxlm.data.encode import token_dtype, train_tokenizer_on_documents
from flaxlm.data.fingerprints import content_sha256
from flaxlm.data.prepare_worker import (
    Unit,
    plan_units,
    prepare_unit,
    quick_fingerprint,
    unit_files,
    write_atomically,
)
from flaxlm.data.sources import SourceSpec, list_source_files, raw_documents, resolve_sources
from flaxlm.tokenizers.sentencepiece import Tokenizer, check_vocab

PREPARED_FORMAT = 1
# At most this much text trains a tokenizer; larger corpora are sampled by a hash of doc ids.
TOKENIZER_SAMPLE_BYTES = 2 << 30
UNIT_SPLIT_KEYS = ("n_docs", "n_tokens", "tokens_bytes", "tokens_sha256")  # per unit and split


def prepare_corpus(cfg: Config, out: str | Path, workers: int = 0, progress: bool = True) -> dict:
    """Prepares ``cfg.data``'s sources into ``out`` (see the module doc); returns the manifest.

    ``workers``: processes tokenizing units (0 = one per CPU core). A rerun on the same
    ``out`` reuses every finished unit whose source files kept their size and mtime, and a
    complete corpus is left as it is. Raises DataError for unusable sources and when ``out``
    holds a prepare of other settings.
    """
    data = cfg.data
    if data.prepared:
        raise ConfigError(f"data.prepared={data.prepared!r} is set; prepare reads raw sources")
    if not data.paths and not data.sources:
        raise DataError("data.paths and data.sources are empty; nothing to prepare")
    if not storage.is_posix(str(out)):
        return _prepare_into_bucket(cfg, str(out), workers, progress)
    out = Path(out)
    start = time.perf_counter()
    specs = resolve_sources(data)
    plan = _plan(cfg, specs)
    _claim(out, plan)
    with _prepare_lock(out):
        manifest = _prepare_claimed(cfg, out, specs, workers, progress)
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    return manifest


def _prepare_into_bucket(cfg: Config, url: str, workers: int, progress: bool) -> dict:
    """Prepares into a local folder (:func:`flaxlm.storage.local_cache`), then publishes it
    to ``url``: every file, ``manifest.json`` last, so a reader never opens half a corpus.
    A bucket already holding a corpus of other settings is refused as a folder is."""
    local = storage.local_cache(url)
    remote_plan = storage.join(url, "plan.json")
    if not (local / "plan.json").is_file() and storage.info(remote_plan) is not None:
        local.mkdir(parents=True, exist_ok=True)
        (local / "plan.json").write_bytes(storage.read_bytes(remote_plan))
    manifest = prepare_corpus(cfg, local, workers, progress)
    storage.publish(local, url, "manifest.json")
    return manifest


@contextlib.contextmanager
def _prepare_lock(out: Path) -> Iterator[None]:
    """One prepare per folder: ``out/.prepare.lock`` (an flock, released by the kernel
    when its holder dies, kill -9 included). Raises DataError naming the holder's pid."""
    path = out / ".prepare.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise DataError(
                f"{out} is being prepared by another flaxlm data prepare ({holder}); wait "
                "for it, or stop it: a rerun continues where it stopped"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare_claimed(
    cfg: Config, out: Path, specs: list[SourceSpec], workers: int, progress: bool
) -> dict:
    data = cfg.data
    tokenizer = _tokenizer(cfg, specs, out, progress)
    check_vocab(tokenizer, cfg.model.vocab_size)
    units = plan_units(specs, data.tfds_data_dir)
    if not units:
        raise DataError(f"data sources {[s.paths for s in specs]} hold no files")

    todo = [u for u in units if not _unit_is_current(out, u, data.tfds_data_dir)]
    for stale in (out / "units").glob(".tmp-*"):  # left by a killed prepare
        shutil.rmtree(stale, ignore_errors=True)
    (out / "units").mkdir(parents=True, exist_ok=True)
    if todo:
        (out / "manifest.json").unlink(missing_ok=True)  # incomplete again until rewritten
        _run_units(cfg, out, specs, todo, workers, progress)
    manifest = _finalize(cfg, out, specs, units, tokenizer)
    manifest["units_prepared"] = len(todo)
    return manifest


def _plan(cfg: Config, specs: list[SourceSpec]) -> dict:
    """Everything a unit's tokens depend on, besides its own files."""
    d = cfg.data
    plan = {
        "format": PREPARED_FORMAT,
        "sources": [asdict(s) for s in specs],
        "doc_split": d.doc_split,
        "val_fraction": d.val_fraction,
        "tokenizer": d.tokenizer or {
            "train_type": d.tokenizer_type, "vocab_size": d.tokenizer_vocab_size,
            "byte_fallback": d.byte_fallback,
            "character_coverage": d.tokenizer_character_coverage,
            "normalization": d.tokenizer_normalization,
        },
        "tokenizer_specials": d.tokenizer_specials,
    }  # fmt: skip
    return json.loads(json.dumps(plan))  # as plan.json reads back (tuples become lists)


def _claim(out: Path, plan: dict) -> None:
    """Writes plan.json, or checks that the one there is this prepare's."""
    path = out / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise DataError(
                f"{out} holds a prepared corpus of other settings (differing: {', '.join(diff)});"
                " expected an empty folder or one prepared with this config"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out} is not empty and holds no plan.json; expected a new folder")
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(plan, indent=2))


def _tokenizer(cfg: Config, specs: list[SourceSpec], out: Path, progress: bool) -> Tokenizer:
    """The corpus's tokenizer: stored in ``out``, else data.tokenizer, else trained once."""
    path, d = out / "tokenizer.model", cfg.data
    if path.is_file():
        return Tokenizer.from_bytes(path.read_bytes(), source=str(path))
    if d.tokenizer:
        tokenizer = Tokenizer.load(d.tokenizer, d.tokenizer_specials)
    else:
        if progress:
            print(f"training a {d.tokenizer_vocab_size}-piece tokenizer on the train split")
        total = sum(f.path.stat().st_size for s in specs
                    for f in list_source_files(s.paths, d.tfds_data_dir))  # fmt: skip
        share = min(1.0, TOKENIZER_SAMPLE_BYTES / max(total, 1))
        tmp = out / f".tokenizer-{os.getpid()}"
        model = train_tokenizer_on_documents(
            _tokenizer_sample(specs, cfg, share),
            tmp,
            d.tokenizer_vocab_size,
            model_type=d.tokenizer_type,
            byte_fallback=d.byte_fallback,
            character_coverage=d.tokenizer_character_coverage,
            normalization=d.tokenizer_normalization,
        )
        tokenizer = Tokenizer.load(model)
        model.unlink()
        model.with_suffix(".vocab").unlink(missing_ok=True)
    write_atomically(path, tokenizer.model_bytes)
    return Tokenizer.from_bytes(tokenizer.model_bytes, source=str(path))


def _tokenizer_sample(specs: list[SourceSpec], cfg: Config, share: float) -> Iterator[Document]:
    """The train documents (all of them up to TOKENIZER_SAMPLE_BYTES; else a hashed share)."""
    d = cfg.data
    for spec in specs:
        for raw in spec.paths:
            for doc in raw_documents([raw], spec.field, spec.split, d.tfds_data_dir):
                for piece in split_document(doc, d.doc_split):
                    if not piece.text.strip() or doc_hash_fraction(piece.doc_id) < d.val_fraction:
                        continue
                    if share < 1.0 and doc_hash_fraction(piece.doc_id + "#tok") >= share:
                        continue
                    yield piece


def _unit_is_current(out: Path, unit: Unit, tfds_data_dir: str) -> bool:
    """True when the unit's folder is complete and its files kept their size and mtime."""
    meta = out / unit.folder / "unit.json"
    if not meta.is_file():
        return False
    recorded = json.loads(meta.read_text())
    try:
        now = quick_fingerprint(unit_files(unit, tfds_data_dir))
    except OSError:
        return False
    quick = [{k: f[k] for k in ("path", "doc_id", "size", "mtime_ns")} for f in recorded["files"]]
    if quick == now and recorded["unit"] == asdict(unit):
        return True
    shutil.rmtree(out / unit.folder)  # its sources changed: redo it
    return False


def _run_units(
    cfg: Config, out: Path, specs: list[SourceSpec], todo: list[Unit], workers: int, progress: bool
) -> None:
    workers = min(workers or os.cpu_count() or 1, len(todo))
    sizes = {u.index: _unit_bytes(u, cfg.data.tfds_data_dir) for u in todo}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="preparing",
               disable=not progress)  # fmt: skip
    jobs = sorted(todo, key=lambda u: -sizes[u.index])  # largest first: even finish
    n_tokens, t0 = 0, time.perf_counter()
    if workers <= 1:
        results = ((u, prepare_unit(cfg, out, u, specs[u.source])) for u in jobs)
        pool = None
    else:
        # spawn, not fork: the parent may hold JAX or sentencepiece threads.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        futures = {pool.submit(prepare_unit, cfg, out, u, specs[u.source]): u for u in jobs}
        results = ((futures[f], f.result()) for f in as_completed(futures))
    try:
        for unit, summary in results:
            n_tokens += summary["train"]["n_tokens"] + summary["val"]["n_tokens"]
            bar.update(sizes[unit.index])
            bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _unit_bytes(unit: Unit, tfds_data_dir: str) -> int:
    return sum(f.path.stat().st_size for f in unit_files(unit, tfds_data_dir))


def _finalize(
    cfg: Config, out: Path, specs: list[SourceSpec], units: list[Unit], tokenizer: Tokenizer
) -> dict:
    """Joins the units' offsets and counts into the split-level files; writes the manifest."""
    summaries = [json.loads((out / u.folder / "unit.json").read_text()) for u in units]
    splits: dict = {}
    for name in SPLITS:
        n_docs = sum(s[name]["n_docs"] for s in summaries)
        if n_docs == 0:
            raise DataError(
                f"the {name} split is empty ({len(units)} units); expected documents in both "
                f"splits (data.val_fraction={cfg.data.val_fraction})"
            )
        _join_offsets(out / f"{name}.doc_offsets.npy", out, units, name)
        if len(specs) > 1:
            for s in range(len(specs)):
                mine = [u for u in units if u.source == s]
                _join_offsets(out / f"{name}.s{s}.doc_offsets.npy", out, mine, name)
        counts = sum(np.load(out / u.folder / f"{name}.counts.npy") for u in units)
        np.save(out / f"{name}.counts.npy", counts)
        splits[name] = {"n_docs": n_docs, "n_tokens": sum(s[name]["n_tokens"] for s in summaries)}
    sources = []
    for s, spec in enumerate(specs):
        mine = [(u, m) for u, m in zip(units, summaries, strict=True) if u.source == s]
        if not mine:
            raise DataError(f"source {spec.name!r} ({list(spec.paths)}) has no files")
        files = [f for _, m in mine for f in m["files"]]
        sources.append({
            "name": spec.name, "weight": spec.weight, "paths": list(spec.paths),
            "field": spec.field,
            "units": [mine[0][0].index, mine[-1][0].index + 1],
            **{f"{n}_docs": sum(m[n]["n_docs"] for _, m in mine) for n in SPLITS},
            **{f"{n}_tokens": sum(m[n]["n_tokens"] for _, m in mine) for n in SPLITS},
            "n_empty_docs": sum(m["n_empty_docs"] for _, m in mine),
            "content_sha256": content_sha256(files),
        })  # fmt: skip
    manifest = {
        "format": PREPARED_FORMAT,
        "tokenizer": {
            "file": "tokenizer.model",
            "sha256": hashlib.sha256(tokenizer.model_bytes).hexdigest(),
            "vocab_size": tokenizer.vocab_size,
        },
        "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
        "doc_split": cfg.data.doc_split,
        "val_fraction": cfg.data.val_fraction,
        "splits": splits,
        "sources": sources,
        "units": [
            {"folder": u.folder, "source": u.source,
             **{n: {k: m[n][k] for k in UNIT_SPLIT_KEYS} for n in SPLITS}, "files": m["files"]}
            for u, m in zip(units, summaries, strict=True)
        ],
    }  # fmt: skip
    write_atomically(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def _join_offsets(dst: Path, out: Path, units: list[Unit], name: str) -> None:
    """The units' document offsets as one (n_docs + 1,) int64 array, written in pieces."""
    offsets = [np.load(out / u.folder / f"{name}.doc_offsets.npy", mmap_mode="r") for u in units]
    n_docs = sum(len(o) - 1 for o in offsets)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    joined = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(n_docs + 1,))
    joined[0], at, base = 0, 1, 0
    for o in offsets:
        joined[at : at + len(o) - 1] = np.asarray(o[1:]) + base
        at, base = at + len(o) - 1, base + int(o[-1])
    joined.flush()
    del joined
    os.replace(tmp, dst)
