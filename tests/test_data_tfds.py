"""TFDS on disk (array_record, no TensorFlow): build from local files, read back, never download."""

import json
import socket
import time

import pytest

from flaxlm.cli import main
from flaxlm.data import DataError, iter_documents

pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")

from flaxlm.data.tfds_build import build_tfds  # noqa: E402
from flaxlm.data.tfds_source import prepared_dir  # noqa: E402


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def make_sources(root):
    root.mkdir()
    (root / "play.txt").write_text("Enter Ghost.\n\n  Exit Ghost.\n")
    lines = [{"text": "雪が降る 😀"}, {"text": "  "}, {"text": "third\u2028line"}]
    (root / "lines.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def test_built_dataset_reads_back_identically(tmp_path, no_network):
    src = make_sources(tmp_path / "src")
    out = build_tfds([str(src)], "tiny_corpus", str(tmp_path / "tfds"), progress=False)
    assert out == tmp_path / "tfds" / "tiny_corpus" / "1.0.0"
    assert any(p.name.startswith("tiny_corpus-train.array_record") for p in out.iterdir())
    original = list(iter_documents([str(src)], "text"))
    for spec in ("tfds:tiny_corpus", "tfds:tiny_corpus:1.0.0"):
        read = list(iter_documents([spec], "text", tfds_data_dir=str(tmp_path / "tfds")))
        assert read == original  # same ids and texts, same order: same train/val split
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        build_tfds([str(src)], "tiny_corpus", str(tmp_path / "tfds"), progress=False)


def test_unprepared_catalog_dataset_fails_fast_without_network(tmp_path, no_network):
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        list(iter_documents(["tfds:mnist"], "text", tfds_data_dir=str(tmp_path)))
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "'tfds:mnist' is not prepared in" in message and "never downloads" in message
    assert "tfds build mnist --data_dir DIR --file_format array_record" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # nothing created either


def test_wrong_split_feature_and_spec_are_named(tmp_path):
    build_tfds([str(make_sources(tmp_path / "src"))], "c", str(tmp_path), progress=False)
    with pytest.raises(DataError, match=r"no split 'validation' \(found: train\)"):
        list(iter_documents(["tfds:c"], "text", split="validation", tfds_data_dir=str(tmp_path)))
    with pytest.raises(DataError, match=r"no feature 'body' \(found: doc_id, text\)"):
        list(iter_documents(["tfds:c"], "body", tfds_data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="malformed"):
        prepared_dir("tfds:Bad-Name", str(tmp_path))


def test_tfrecord_dataset_is_refused_with_the_reason(tmp_path):
    folder = tmp_path / "old" / "1.0.0"
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text(json.dumps({"name": "old"}))
    with pytest.raises(DataError, match="stored as tfrecord, which needs TensorFlow"):
        prepared_dir("tfds:old", str(tmp_path))


def test_cli_build_then_train_config_reads_it(tmp_path, capsys):
    src = make_sources(tmp_path / "src")
    data_dir = tmp_path / "tfds"
    rc = main(["data", "build-tfds", str(src), "--name", "shared", "--data-dir", str(data_dir)])
    assert rc == 0 and "tfds:shared" in capsys.readouterr().out
    from flaxlm.config import load_config

    cfg = load_config(None, ["data.paths=[tfds:shared]", f"data.tfds_data_dir={data_dir}"])
    assert len(list(iter_documents(cfg.data.paths, tfds_data_dir=cfg.data.tfds_data_dir))) == 3
