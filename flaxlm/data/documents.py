"""Documents and the plain-file readers: the bottom of the data sources.

A :class:`Document` is the unit that the train/val split holds out and that packed sequences
never predict across. This module reads one file into documents by its kind (jsonl, Parquet or
text; see flaxlm/data/sources.py for the rules) and turns a column of values into documents
(:func:`text_rows`, shared by the Parquet, HF and TFDS readers). It imports no other flaxlm
module: sources.py, hf_source.py and tfds_source.py build on it.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
    path: Path  # on local disk (a bucket's file: its staged copy)
    doc_id: str  # the id of its document, or the prefix of its jsonl line / row ids
    origin: str = ""  # the URL a staged copy came from; "" for a local file

    @property
    def where(self) -> str:
        """Where the file lives, for keys and messages: its URL, or its absolute path."""
        return self.origin or str(self.path.resolve())

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


def file_documents(source: SourceFile, field: str) -> Iterator[Document]:
    """Every document of one file (empty ones included), read by its kind."""
    if source.kind == "parquet":
        yield from _parquet_documents(source, field)
    elif source.path.suffix == ".jsonl":
        # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends.
        yield from _jsonl_documents(source, read_text(source.path).split("\n"), field)
    elif source.kind == "jsonl":
        yield from _jsonl_documents(source, _decompressed_lines(source.path), field)
    else:
        yield Document(source.doc_id, read_text(source.path))


def split_document(doc: Document, how: str) -> Iterator[Document]:
    """``doc`` cut by ``data.doc_split``: ``none`` (whole), ``blank_lines`` (paragraphs: runs
    of lines between empty lines), ``lines`` (each line), ``chars:N`` (pieces of at most N
    characters, each ended at the last newline, else space, in its second half if there is
    one). The pieces' ids are ``<doc id>#<i>``; empty pieces are kept (the caller counts and
    skips them), and joining the pieces gives back the text (minus the separators)."""
    if how == "none":
        yield doc
        return
    if how == "lines":
        parts = doc.text.split("\n")
    elif how == "blank_lines":
        parts = [p.strip("\n") for p in re.split(r"\n(?:[ \t]*\n)+", doc.text)]
    else:
        parts = list(_chunks(doc.text, int(how.split(":", 1)[1])))
    for i, part in enumerate(parts):
        yield Document(f"{doc.doc_id}#{i}", part)


AUTO_CHUNK_CHARS = 4096  # the pieces of a one-document corpus with no line breaks


def auto_split(doc: Document) -> str:
    """How to cut the only document of a corpus (one big ``input.txt``) into documents: the
    first of ``blank_lines``, ``lines`` that gives two non-empty pieces, else ``chars:N``
    (pieces of 4096 characters; of half the text when it is shorter)."""
    for how in ("blank_lines", "lines"):
        pieces = (p for p in split_document(doc, how) if p.text.strip())
        if next(pieces, None) is not None and next(pieces, None) is not None:
            return how
    return f"chars:{max(1, min(AUTO_CHUNK_CHARS, len(doc.text) // 2))}"


def _chunks(text: str, size: int) -> Iterator[str]:
    while len(text) > size:
        head = text[:size]
        cut = max(head.rfind("\n"), head.rfind(" ")) + 1
        if cut <= size // 2:
            cut = size
        yield text[:cut]
        text = text[cut:]
    yield text


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


def read_text(path: Path) -> str:
    """The file (``.gz``: decompressed) decoded as UTF-8; DataError names the offset of the
    first bad byte."""
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
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
