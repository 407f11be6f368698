"""Sources: files, folders, Parquet, HF datasets and TFDS datasets on disk, read as documents.

A document is the unit that the train/val split holds out and that packed sequences never
predict across. The rules, per entry of ``data.paths`` (or ``path`` of a ``data.sources`` item):

- a ``.jsonl`` file (also ``.jsonl.gz``, ``.jsonl.zst``) holds one document per line, its text
  in one field (``data.jsonl_field`` or the source's ``field``);
- a ``.parquet`` file holds one document per row, its text in one column (the same field);
- any other file (``.txt``, ``.md``, ...) is one document;
- a directory stands for every file below it, recursively, in sorted order (hidden files and
  folders, whose names start with ``.``, are left out), each read by the rules above;
- a folder written by ``datasets.Dataset.save_to_disk`` is read with ``load_from_disk``, and
  ``hf:PATH`` reads local JSON/JSONL/Parquet/CSV files through ``datasets`` (extra ``datasets``;
  see :mod:`flaxlm.data.hf_source`);
- ``tfds:NAME[/CONFIG][:VERSION]`` reads a TFDS dataset prepared (array_record) in
  ``data.tfds_data_dir`` (extra ``tfds``; see :mod:`flaxlm.data.tfds_source`);
- a file or folder in a bucket (a URL) is copied to this host once
  (:func:`flaxlm.storage.stage`; again only for objects that changed) and read by the rules
  above; its files' URLs enter the cache key.

Document ids are stable across machines: the path relative to the directory given (or the file
name for a file given directly), plus ``:<line>`` for jsonl lines and ``:<row>`` (from 0) for
Parquet and dataset rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flaxlm import storage
from flaxlm.config import DataConfig, source_name
from flaxlm.data import hf_source, tfds_source

# DataError, Document and SourceFile are defined there; importing them from here still works.
from flaxlm.data.documents import DataError, Document, SourceFile, file_documents


@dataclass(frozen=True)
class SourceSpec:
    """One resolved source: what to read and its share of the training rows."""

    name: str
    paths: tuple[str, ...]
    field: str = "text"
    split: str = "train"  # the split of a TFDS / HF dataset
    weight: float = 1.0


def resolve_sources(data_cfg: DataConfig) -> list[SourceSpec]:
    """``data.sources`` as SourceSpecs, or ``data.paths`` as one source named ``data``."""
    if not data_cfg.sources:
        return [SourceSpec("data", tuple(data_cfg.paths), data_cfg.jsonl_field)]
    return [
        SourceSpec(
            source_name(s), (s.path,), s.field or data_cfg.jsonl_field, s.split, float(s.weight)
        )
        for s in data_cfg.sources
    ]


@dataclass
class SourceStats:
    """Counts kept while reading; pass one to :func:`iter_documents` to see them."""

    n_docs: int = 0
    n_empty: int = 0  # empty or whitespace-only documents, skipped


def list_source_files(paths: Iterable[str], tfds_data_dir: str = "") -> list[SourceFile]:
    """Every file the sources stand for, in reading order (dataset folders: all their files).

    This is what the cache key hashes; :func:`iter_documents` reads datasets as a whole.
    """
    files: list[SourceFile] = []
    for raw in paths:
        if raw.startswith("tfds:"):
            root = tfds_source.prepared_dir(raw, tfds_data_dir)
            files += [SourceFile(p, f"{raw}/{p.name}") for p in sorted(root.iterdir())]
            continue
        if raw.startswith("hf:"):
            raw = raw[len("hf:") :]
        missing = DataError(f"data source {raw!r} is neither a file nor a directory")
        try:
            root = storage.stage(raw)  # a bucket's files: copied to this host once
        except FileNotFoundError:
            raise missing from None
        origin = "" if storage.is_posix(raw) else raw
        if root.is_dir():
            below = sorted(
                p
                for p in root.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(root).parts)
            )
            files += [
                SourceFile(p, rel, origin and storage.join(origin, rel))
                for p, rel in ((p, p.relative_to(root).as_posix()) for p in below)
            ]
        elif root.is_file():
            files.append(SourceFile(root, root.name, origin))
        else:
            raise missing
    return files


def iter_documents(
    paths: Iterable[str],
    jsonl_field: str = "text",
    stats: SourceStats | None = None,
    *,
    split: str = "train",
    tfds_data_dir: str = "",
) -> Iterator[Document]:
    """Yields the non-empty documents of the sources, in a fixed order.

    ``split`` names the split read from TFDS / HF datasets; ``tfds_data_dir`` where prepared
    TFDS datasets live. Raises DataError for non-UTF-8 bytes (naming file and byte offset), bad
    jsonl lines or rows, and sources that hold no non-empty document at all. Empty documents
    are counted in ``stats``.
    """
    paths = list(paths)
    stats = stats if stats is not None else SourceStats()
    for doc in raw_documents(paths, jsonl_field, split, tfds_data_dir):
        if doc.text.strip():
            stats.n_docs += 1
            yield doc
        else:
            stats.n_empty += 1
    if stats.n_docs == 0:
        raise DataError(
            f"data sources {paths} hold no non-empty documents "
            f"({stats.n_empty} empty ones skipped); expected text files, folders or .jsonl"
        )


def raw_documents(
    paths: list[str], field: str, split: str, tfds_data_dir: str
) -> Iterator[Document]:
    """Every document, empty ones included, entry by entry."""
    for raw in paths:
        if raw.startswith("tfds:"):
            yield from tfds_source.tfds_documents(raw, field, split, tfds_data_dir)
        elif raw.startswith("hf:"):
            yield from hf_source.hf_file_documents(Path(raw[len("hf:") :]), field, split)
        elif hf_source.is_saved_dataset(Path(raw)):
            yield from hf_source.hf_saved_documents(Path(raw), field, split)
        else:
            for source in list_source_files([raw]):
                yield from file_documents(source, field)
