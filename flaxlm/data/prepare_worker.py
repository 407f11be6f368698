"""One unit of a prepared corpus (flaxlm/data/prepare.py): a source file, or a whole dataset,
tokenized by a worker process into its own folder and renamed into place when complete.

    specs = resolve_sources(cfg.data)
    units = plan_units(specs, cfg.data.tfds_data_dir)
    summary = prepare_unit(cfg, out, units[0], specs[units[0].source])  # out/units/u000000/
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flaxlm.config import Config
from flaxlm.data.cache import SPLITS, doc_hash_fraction
from flaxlm.data.documents import DataError, Document, SourceFile, file_documents, split_document
from flaxlm.data.encode import encode_documents, token_dtype
from flaxlm.data.fingerprints import file_sha256
from flaxlm.data.sources import SourceSpec, list_source_files, raw_documents
from flaxlm.data.token_split import SplitWriter
from flaxlm.tokenizers.sentencepiece import Tokenizer


@dataclass(frozen=True)
class Unit:
    """One piece of work: a source file, or a whole dataset (``tfds:`` / ``hf:`` / saved)."""

    index: int
    source: int  # index into the plan's sources
    kind: str  # "file" or "dataset"
    path: str  # the file, or the dataset entry as written in the config
    doc_id: str  # a file's doc id (prefix); "" for datasets

    @property
    def folder(self) -> str:
        return f"units/u{self.index:06d}"


def plan_units(specs: list[SourceSpec], tfds_data_dir: str) -> list[Unit]:
    """The units of the sources, in reading order (the order of the cache's documents)."""
    from flaxlm.data import hf_source

    units: list[Unit] = []
    for s, spec in enumerate(specs):
        for raw in spec.paths:
            is_dataset = raw.startswith(("tfds:", "hf:")) or hf_source.is_saved_dataset(Path(raw))
            if is_dataset:
                units.append(Unit(len(units), s, "dataset", raw, ""))
                continue
            for f in list_source_files([raw], tfds_data_dir):
                units.append(Unit(len(units), s, "file", str(f.path.resolve()), f.doc_id))
    return units


def unit_files(unit: Unit, tfds_data_dir: str) -> list[SourceFile]:
    if unit.kind == "file":
        return [SourceFile(Path(unit.path), unit.doc_id)]
    return list_source_files([unit.path], tfds_data_dir)


def quick_fingerprint(files: list[SourceFile]) -> list[dict]:
    """Path, size and mtime of each file: what a rerun compares before trusting a unit."""
    out = []
    for f in files:
        st = f.path.stat()
        out.append({"path": str(f.path), "doc_id": f.doc_id, "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns})  # fmt: skip
    return out


def unit_documents(cfg: Config, unit: Unit, spec: SourceSpec) -> Iterator[Document]:
    """The documents of ``unit`` (of source ``spec``), each cut by ``data.doc_split``."""
    d = cfg.data
    if unit.kind == "file":
        docs = file_documents(SourceFile(Path(unit.path), unit.doc_id), spec.field)
    else:
        docs = raw_documents([unit.path], spec.field, spec.split, d.tfds_data_dir)
    for doc in docs:
        yield from split_document(doc, d.doc_split)


def prepare_unit(cfg: Config, out: Path, unit: Unit, spec: SourceSpec) -> dict:
    """Tokenizes one unit into ``out/units/.tmp-*`` and renames it to its folder (in a worker).
    ``spec``: the unit's source, resolved once by the parent and sent along (not re-resolved
    per unit)."""
    tokenizer = Tokenizer.from_bytes((out / "tokenizer.model").read_bytes())
    files = unit_files(unit, cfg.data.tfds_data_dir)
    before = quick_fingerprint(files)
    tmp = out / "units" / f".tmp-u{unit.index:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    V, dtype = tokenizer.vocab_size, token_dtype(tokenizer.vocab_size)
    writers = {name: SplitWriter(tmp, name, dtype) for name in SPLITS}
    counts = {name: np.zeros((2, V), np.int64) for name in SPLITS}
    n_empty = 0

    def non_empty() -> Iterator[Document]:
        nonlocal n_empty
        for doc in unit_documents(cfg, unit, spec):
            if doc.text.strip():
                yield doc
            else:
                n_empty += 1

    val_fraction = cfg.data.val_fraction
    for doc, ids in encode_documents(non_empty(), tokenizer):
        name = "val" if doc_hash_fraction(doc.doc_id) < val_fraction else "train"
        writers[name].add(doc.doc_id, ids)
        counts[name][0] += np.bincount(ids, minlength=V)[:V]
        counts[name][1, ids[0]] += 1
    summary: dict = {"unit": asdict(unit), "n_empty_docs": n_empty}
    for name in SPLITS:
        summary[name] = writers[name].finish()
        np.save(tmp / f"{name}.counts.npy", counts[name])
        summary[name]["tokens_bytes"] = (tmp / f"{name}.tokens.npy").stat().st_size
        summary[name]["tokens_sha256"] = file_sha256(tmp / f"{name}.tokens.npy")
    # The files must not have changed while they were read (else their hash lies).
    summary["files"] = [
        {**fp, "sha256": file_sha256(f.path)} for fp, f in zip(before, files, strict=True)
    ]
    if quick_fingerprint(files) != before:
        shutil.rmtree(tmp)
        raise DataError(f"{unit.path} changed while it was being prepared; rerun prepare")
    write_atomically(tmp / "unit.json", json.dumps(summary, indent=1))
    fsync_folder(tmp)
    try:
        os.rename(tmp, out / unit.folder)
    except OSError:  # a worker orphaned by a killed prepare finished this unit first
        if not (out / unit.folder / "unit.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def write_atomically(path: Path, content: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
