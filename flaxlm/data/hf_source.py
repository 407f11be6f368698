"""HuggingFace ``datasets`` on disk as a source (optional extra ``datasets``); never the hub.

Two forms, both read offline (``HF_DATASETS_OFFLINE=1`` is set before ``datasets`` loads):

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (it holds
  ``state.json`` or ``dataset_dict.json``): read with ``datasets.load_from_disk``; for a
  DatasetDict the source's ``split`` picks the split;
- ``hf:PATH``, a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file or a folder of them:
  read with ``datasets.load_dataset(<format>, data_files=...)`` into a throwaway cache.

Document ids are ``<folder or file name>[/<split>]:<row>``, rows counted from 0.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flaxlm.data.documents import DataError, Document, text_rows

ROWS_PER_READ = 1024
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by ``save_to_disk``."""
    return path.is_dir() and any(
        (path / name).is_file() for name in ("state.json", "dataset_dict.json")
    )


def import_datasets() -> Any:
    """The ``datasets`` module, forced offline; DataError naming the extra when missing."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading HuggingFace datasets needs the datasets package: "
            "pip install 'flaxlm[datasets]'"
        ) from None
    datasets.disable_progress_bars()
    return datasets


def hf_saved_documents(path: Path, field: str, split: str) -> Iterator[Document]:
    """Every row of a ``save_to_disk`` folder (the ``split`` of a DatasetDict), as documents."""
    datasets = import_datasets()
    loaded = datasets.load_from_disk(str(path))
    prefix = path.name
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{path}: no split {split!r} (found: {', '.join(loaded)}); set the source's split"
            )
        loaded, prefix = loaded[split], f"{path.name}/{split}"
    yield from _rows(loaded, field, str(path), prefix)


def hf_file_documents(path: Path, field: str, split: str = "train") -> Iterator[Document]:
    """Rows of local JSON/JSONL/Parquet/CSV files read through ``datasets.load_dataset``."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    formats = {FILE_FORMATS.get("".join(p.suffixes[-1:])) for p in files}
    if not files or len(formats) != 1 or None in formats:
        raise DataError(
            f"hf:{path}: expected one or more files of one format "
            f"({', '.join(FILE_FORMATS)}), found {[p.name for p in files][:5]}"
        )
    datasets = import_datasets()
    with tempfile.TemporaryDirectory(prefix="flaxlm-hf-") as cache:
        loaded = datasets.load_dataset(
            formats.pop(), data_files=[str(p) for p in files], split="train", cache_dir=cache
        )
        yield from _rows(loaded, field, f"hf:{path}", path.name)


def _rows(dataset: Any, field: str, where: str, prefix: str) -> Iterator[Document]:
    if field not in dataset.column_names:
        raise DataError(
            f"{where}: no column {field!r} (found: {', '.join(dataset.column_names)}); "
            "set data.jsonl_field or the source's field"
        )
    column = dataset.select_columns([field])
    for start in range(0, len(column), ROWS_PER_READ):
        values = column[start : start + ROWS_PER_READ][field]
        yield from text_rows(values, where, prefix, start)
