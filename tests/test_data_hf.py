"""HuggingFace datasets on disk: load_from_disk folders and local files through `datasets`."""

import json

import pytest

from flaxlm.config import DataConfig
from flaxlm.data import DataError, iter_documents, prepare_data

datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed")

TEXTS = ["The first review.", "", "第二 review\n  spaced", "fourth one"]


def test_load_from_disk_round_trip(tmp_path):
    path = tmp_path / "reviews"
    datasets.Dataset.from_dict({"review": TEXTS, "label": [0, 1, 0, 1]}).save_to_disk(str(path))
    docs = list(iter_documents([str(path)], "review"))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("reviews:0", TEXTS[0]),
        ("reviews:2", TEXTS[2]),
        ("reviews:3", TEXTS[3]),
    ]
    with pytest.raises(DataError, match=r"no column 'text' \(found: review, label\)"):
        list(iter_documents([str(path)], "text"))


def test_dataset_dict_reads_the_named_split(tmp_path):
    path = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a train doc", "another"]}),
            "test": datasets.Dataset.from_dict({"text": ["a test doc"]}),
        }
    ).save_to_disk(str(path))
    assert [d.doc_id for d in iter_documents([str(path)])] == ["dd/train:0", "dd/train:1"]
    assert [d.text for d in iter_documents([str(path)], split="test")] == ["a test doc"]
    with pytest.raises(DataError, match=r"no split 'validation' \(found: train, test\)"):
        list(iter_documents([str(path)], split="validation"))


def test_local_json_files_through_datasets_match_direct_reading(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    through_hf = [d.text for d in iter_documents([f"hf:{path}"])]
    direct = [d.text for d in iter_documents([str(path)])]
    assert through_hf == direct == [TEXTS[0], TEXTS[2], TEXTS[3]]


def test_saved_dataset_as_a_cached_source(tmp_path):
    texts = [f"document number {i} says hello world" for i in range(30)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(
        paths=[str(tmp_path / "hf")], cache_dir=str(tmp_path / "cache"),
        tokenizer_vocab_size=300, val_fraction=0.2,
    )  # fmt: skip
    data = prepare_data(cfg, progress=False)
    assert data.train.n_docs + data.val.n_docs == 30
    first = data.train.tokens[: data.train.doc_offsets[1] - 1].tolist()
    assert data.tokenizer.decode(first) == texts[int(data.train.doc_ids()[0].split(":")[1])]
    assert prepare_data(cfg, progress=False).cache_hit
