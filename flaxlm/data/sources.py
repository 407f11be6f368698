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
  ``data.tfds_data_dir`` (extra ``tfds``; see :mod:`flaxlm.data.tfds_source`).

Document ids are stable across machines: the path relative to the directory given (or the file
name for a file given directly), plus ``:<line>`` for jsonl lines and ``:<row>`` (from 0) for
Parquet and dataset rows.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flaxlm.config import DataConfig, source_name

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_BATCH_ROWS = 1024


class DataError(ValueError):
    """Input data is unreadable or unusable; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


@dataclass(frozen=True)
class SourceFile:
    path: Path
    doc_id: str  # the id of its document, or the prefix of its jsonl line / row ids

    @property
    def is_jsonl(self) -> bool:
        return self.path.suffix == ".jsonl"

    @property
    def kind(self) -> str:
        """``jsonl`` (plain or compressed), ``parquet`` or ``text``."""
        name = self.path.name
        if name.endswith(JSONL_SUFFIXES):
            return "jsonl"
        return "parquet" if name.endswith(".parquet") else "text"


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
            from flaxlm.data.tfds_source import prepared_dir

            root = prepared_dir(raw, tfds_data_dir)
            files += [SourceFile(p, f"{raw}/{p.name}") for p in sorted(root.iterdir())]
            continue
        if raw.startswith("hf:"):
            raw = raw[len("hf:") :]
        root = Path(raw)
        if root.is_dir():
            below = sorted(
                p
                for p in root.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(root).parts)
            )
            files += [SourceFile(p, p.relative_to(root).as_posix()) for p in below]
        elif root.is_file():
            files.append(SourceFile(root, root.name))
        else:
            raise DataError(f"data source {raw!r} is neither a file nor a directory")
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
    for doc in _raw_documents(paths, jsonl_field, split, tfds_data_dir):
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


def read_text(path: Path) -> str:
    """The file decoded as UTF-8; DataError names the offset of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {e.start} (byte 0x{data[e.start]:02x}); "
            "expected UTF-8 text"
        ) from None


def _jsonl_documents(source: SourceFile, lines: Iterable[str], field: str) -> Iterator[Document]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not documents
        where = f"{source.path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: invalid JSON ({e.msg}); expected one object per line"
            ) from None
        if not isinstance(record, dict) or field not in record:
            keys = (
                ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            )
            raise DataError(f"{where}: no field {field!r} (found: {keys}); set data.jsonl_field")
        value = record[field]
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field {field!r} is {type(value).__name__}, expected a string"
            )
        yield Document(f"{source.doc_id}:{lineno}", value)


def _raw_documents(
    paths: list[str], field: str, split: str, tfds_data_dir: str
) -> Iterator[Document]:
    """Every document, empty ones included, entry by entry."""
    from flaxlm.data import hf_source

    for raw in paths:
        if raw.startswith("tfds:"):
            from flaxlm.data.tfds_source import tfds_documents

            yield from tfds_documents(raw, field, split, tfds_data_dir)
        elif raw.startswith("hf:"):
            yield from hf_source.hf_file_documents(Path(raw[len("hf:") :]), field, split)
        elif hf_source.is_saved_dataset(Path(raw)):
            yield from hf_source.hf_saved_documents(Path(raw), field, split)
        else:
            for source in list_source_files([raw]):
                yield from _file_documents(source, field)


def _file_documents(source: SourceFile, field: str) -> Iterator[Document]:
    if source.kind == "parquet":
        yield from _parquet_documents(source, field)
    elif source.path.suffix == ".jsonl":
        # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends.
        yield from _jsonl_documents(source, read_text(source.path).split("\n"), field)
    elif source.kind == "jsonl":
        yield from _jsonl_documents(source, _decompressed_lines(source.path), field)
    else:
        yield Document(source.doc_id, read_text(source.path))


def _decompressed_lines(path: Path) -> Iterator[str]:
    """Lines of a .gz / .zst file, streamed (never the whole file in memory), as text."""
    if path.name.endswith(".gz"):
        raw: io.BufferedIOBase = gzip.open(path, "rb")
    else:
        try:
            import zstandard
        except ImportError:
            raise DataError(
                f"{path}: reading .zst needs the zstandard package: pip install 'flaxlm[zstd]'"
            ) from None
        raw = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    with raw:
        for lineno, line in enumerate(raw, start=1):
            try:
                yield line.decode("utf-8").rstrip("\n")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 at byte {e.start} of the line; "
                    "expected UTF-8 text"
                ) from None


def _parquet_documents(source: SourceFile, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{source.path}: reading Parquet needs pyarrow: pip install 'flaxlm[parquet]'"
        ) from None
    table = pq.ParquetFile(source.path)
    columns = table.schema_arrow.names
    if field not in columns:
        raise DataError(
            f"{source.path}: no column {field!r} (found: {', '.join(columns)}); "
            "set data.jsonl_field or the source's field"
        )
    row = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
        yield from text_rows(batch.column(0).to_pylist(), f"{source.path}", source.doc_id, row)
        row += batch.num_rows


def text_rows(values: list, where: str, id_prefix: str, first_row: int) -> Iterator[Document]:
    """Documents from one column's values; None counts as empty, non-strings are refused."""
    for i, value in enumerate(values, start=first_row):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: row {i} is not valid UTF-8 at byte {e.start}; expected UTF-8 text"
                ) from None
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise DataError(f"{where}: row {i} is {type(value).__name__}, expected a string")
        yield Document(f"{id_prefix}:{i}", value)
