"""JSONL (plain, .gz, .zst) and Parquet sources: documents, ids, and errors naming the file."""

import gzip
import json

import numpy as np
import pytest

from flaxlm.config import DataConfig
from flaxlm.data import DataError, SourceStats, iter_documents, prepare_data

TEXTS = ["first document\n  with spaces", "", "中文 third\u2028line", "fourth"]


def write_jsonl(path, texts, field="text"):
    lines = "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts))
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines.encode()))
    elif path.name.endswith(".zst"):
        zstandard = pytest.importorskip("zstandard", reason="the zstd extra is not installed")
        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    else:
        path.write_text(lines)
    return path


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.jsonl.zst"])
def test_compressed_jsonl_reads_like_plain_jsonl(tmp_path, name):
    path = write_jsonl(tmp_path / name, TEXTS)
    stats = SourceStats()
    docs = list(iter_documents([str(path)], "text", stats))
    assert [d.doc_id for d in docs] == [f"{name}:1", f"{name}:3", f"{name}:4"]
    assert [d.text for d in docs] == [TEXTS[0], TEXTS[2], TEXTS[3]]
    assert (stats.n_docs, stats.n_empty) == (3, 1)


def test_compressed_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n{"body": "no"}\n'))
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2: no field 'text' \(found: body\)"):
        list(iter_documents([str(path)], "text"))
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2: not valid UTF-8"):
        list(iter_documents([str(path)], "text"))


def write_parquet(path, texts, column="content"):
    pa = pytest.importorskip("pyarrow", reason="the parquet extra (pyarrow) is not installed")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: texts, "n": list(range(len(texts)))}), path, row_group_size=2)
    return path


def test_parquet_rows_are_documents(tmp_path):
    path = write_parquet(tmp_path / "rows.parquet", [*TEXTS, None])
    stats = SourceStats()
    docs = list(iter_documents([str(path)], "content", stats))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("rows.parquet:0", TEXTS[0]),
        ("rows.parquet:2", TEXTS[2]),
        ("rows.parquet:3", TEXTS[3]),
    ]
    assert stats.n_empty == 2  # "" and null
    with pytest.raises(DataError, match=r"rows\.parquet: no column 'text' \(found: content, n\)"):
        list(iter_documents([str(path)], "text"))


def test_folder_mixing_formats_reads_each_by_its_suffix(tmp_path):
    write_jsonl(tmp_path / "a.jsonl.gz", ["gz doc"], field="body")
    write_parquet(tmp_path / "b.parquet", ["parquet doc"], column="body")
    (tmp_path / "c.txt").write_text("text doc")
    docs = list(iter_documents([str(tmp_path)], "body"))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("a.jsonl.gz:1", "gz doc"),
        ("b.parquet:0", "parquet doc"),
        ("c.txt", "text doc"),
    ]


def test_parquet_and_jsonl_gz_tokenize_through_the_cache(tmp_path):
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    texts = [" ".join(rng.choice(words, 30)) for _ in range(40)]
    (tmp_path / "corpus").mkdir()
    write_parquet(tmp_path / "corpus" / "a.parquet", texts[:20], column="text")
    write_jsonl(tmp_path / "corpus" / "b.jsonl.gz", texts[20:])
    cfg = DataConfig(
        paths=[str(tmp_path / "corpus")], cache_dir=str(tmp_path / "cache"),
        tokenizer_vocab_size=300, val_fraction=0.2,
    )  # fmt: skip
    data = prepare_data(cfg, progress=False)
    assert data.train.n_docs + data.val.n_docs == 40
    by_id = {d.doc_id: d.text for d in iter_documents(cfg.paths, "text")}
    split = data.train
    ids = split.doc_ids()
    for d in (0, split.n_docs - 1):
        tokens = split.tokens[split.doc_offsets[d] : split.doc_offsets[d + 1]].tolist()
        assert data.tokenizer.decode(tokens[:-1]) == by_id[ids[d]]
