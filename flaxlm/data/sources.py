"""Text sources: files, directories and .jsonl files, read as documents.

A document is the unit that the train/val split holds out and that packed sequences never
predict across. The rules:

- a ``.jsonl`` file holds one document per line, its text in one field (``data.jsonl_field``);
- any other file (``.txt``, ``.md``, ...) is one document;
- a directory stands for every file below it, recursively, in sorted order (hidden files and
  folders, whose names start with ``.``, are left out).

Document ids are stable across machines: the path relative to the directory given (or the file
name for a file given directly), plus ``:<line>`` for jsonl lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Input data is unreadable or unusable; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


@dataclass(frozen=True)
class SourceFile:
    path: Path
    doc_id: str  # the id of its document, or the prefix of its jsonl line ids

    @property
    def is_jsonl(self) -> bool:
        return self.path.suffix == ".jsonl"


@dataclass
class SourceStats:
    """Counts kept while reading; pass one to :func:`iter_documents` to see them."""

    n_docs: int = 0
    n_empty: int = 0  # empty or whitespace-only documents, skipped


def list_source_files(paths: list[str]) -> list[SourceFile]:
    """Every file the sources stand for, in reading order."""
    files: list[SourceFile] = []
    for raw in paths:
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
    paths: list[str], jsonl_field: str = "text", stats: SourceStats | None = None
) -> Iterator[Document]:
    """Yields the non-empty documents of the sources, in a fixed order.

    Raises DataError for non-UTF-8 bytes (naming file and byte offset), bad jsonl lines, and
    sources that hold no non-empty document at all. Empty documents are counted in ``stats``.
    """
    stats = stats if stats is not None else SourceStats()
    for source in list_source_files(paths):
        text = read_text(source.path)
        if source.is_jsonl:
            docs = _jsonl_documents(source, text, jsonl_field)
        else:
            docs = iter([Document(source.doc_id, text)])
        for doc in docs:
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


def _jsonl_documents(source: SourceFile, text: str, field: str) -> Iterator[Document]:
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends.
    for lineno, line in enumerate(text.split("\n"), start=1):
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
