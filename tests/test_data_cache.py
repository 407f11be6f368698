"""The tokenize-once cache: contents, split by document, reuse, atomic builds, the demo corpus."""

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from flaxlm.config import ConfigError, DataConfig
from flaxlm.data import (
    DataError,
    TokenSplit,
    assign_splits,
    build_folders,
    iter_documents,
    prepare_data,
    tokenize_documents,
    train_tokenizer_on_documents,
    unigram_cross_entropy,
    write_shakespeare,
)
from flaxlm.data.cache import doc_hash_fraction
from flaxlm.tokenizers.sentencepiece import SentencePieceTokenizer, Tokenizer

WORDS = "the king queen ghost sword night crown love death sleep dream speak".split()


def make_corpus(root: Path, n_docs: int = 12, seed: int = 0) -> Path:
    """A folder of small text files plus a jsonl file, with double spaces and newlines."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS, size=8)) for _ in range(6)]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n  indented  line\n")
    records = [{"text": f"jsonl document {i}: " + " ".join(rng.choice(WORDS, 5))} for i in range(4)]
    records.append({"text": "  "})  # empty: counted and skipped
    (root / "more.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


def config(tmp_path: Path, **kwargs) -> DataConfig:
    defaults = dict(
        paths=[str(tmp_path / "corpus")], cache_dir=str(tmp_path / "cache"),
        tokenizer_vocab_size=320, val_fraction=0.25,
    )  # fmt: skip
    return DataConfig(**{**defaults, **kwargs})


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus")


def test_splits_hold_every_document_encoded_and_closed_by_eos(tmp_path, corpus):
    data = prepare_data(config(tmp_path), model_vocab_size=512, progress=False)
    assert not data.cache_hit
    assert data.n_empty_docs == 1
    texts = {d.doc_id: d.text for d in iter_documents([str(corpus)], "text")}
    seen = []
    for split in (data.train, data.val):
        assert split.tokens.dtype == np.uint16
        assert isinstance(split.tokens, np.memmap)
        assert split.doc_offsets[0] == 0 and split.doc_offsets[-1] == split.n_tokens
        for doc_id, lo, hi in zip(
            split.doc_ids(), split.doc_offsets[:-1], split.doc_offsets[1:], strict=True
        ):
            ids = split.tokens[lo:hi].tolist()
            assert ids[-1] == data.tokenizer.eos_id
            assert data.tokenizer.eos_id not in ids[:-1]
            assert data.tokenizer.decode(ids[:-1]) == texts[doc_id]  # exact round trip
            seen.append(doc_id)
    assert sorted(seen) == sorted(texts)  # every document in exactly one split


def test_validation_documents_are_chosen_by_hash_of_their_id(tmp_path, corpus):
    data = prepare_data(config(tmp_path, val_fraction=0.3), progress=False)
    val = set(data.val.doc_ids())
    for doc_id in data.train.doc_ids() + data.val.doc_ids():
        assert (doc_id in val) == (doc_hash_fraction(doc_id) < 0.3)
    assert data.train.n_docs > 0 and data.val.n_docs > 0


def test_each_split_gets_a_document_even_at_extreme_fractions():
    assert assign_splits(["a", "b"], 1e-9).tolist().count(True) == 1
    assert assign_splits(["a", "b"], 1 - 1e-9).tolist().count(False) == 1
    with pytest.raises(DataError, match="need >= 2"):
        assign_splits(["only"], 0.5)


def test_second_run_reuses_the_cache_without_tokenizing(tmp_path, corpus, monkeypatch):
    cfg = config(tmp_path)
    first = prepare_data(cfg, progress=False)
    files = sorted(first.cache_dir.iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]

    def no_encoding(self, texts):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(SentencePieceTokenizer, "encode_batch", no_encoding)
    second = prepare_data(cfg, progress=False)
    assert second.cache_hit and second.cache_dir == first.cache_dir
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert np.array_equal(second.train.tokens, first.train.tokens)
    assert second.tokenizer.model_bytes == first.tokenizer.model_bytes


def test_changed_source_or_setting_gets_a_new_cache(tmp_path, corpus):
    first = prepare_data(config(tmp_path), progress=False)
    (corpus / "doc00.txt").write_text("changed text\n")
    changed = prepare_data(config(tmp_path), progress=False)
    assert not changed.cache_hit and changed.cache_dir != first.cache_dir
    other = prepare_data(config(tmp_path, val_fraction=0.5), progress=False)
    assert not other.cache_hit and other.cache_dir not in (first.cache_dir, changed.cache_dir)


def test_interrupted_build_leaves_no_cache(tmp_path, corpus, monkeypatch):
    def crash(self, texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(SentencePieceTokenizer, "encode_batch", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(config(tmp_path), progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert not prepare_data(config(tmp_path), progress=False).cache_hit


def test_build_folders_of_killed_builds_are_removed_on_the_next_start(tmp_path, corpus):
    root = tmp_path / "cache"
    root.mkdir()
    dead = _finished_pid()
    killed = root / f".build-{'a' * 20}-{build_folders.HOST}-{dead}-x1y2z3"
    live = root / f".build-{'b' * 20}-{build_folders.HOST}-{os.getpid()}-abc_12"
    other_host = root / f".build-{'c' * 20}-otherhost-{dead}-q9"
    old_unnamed = root / ".build-dddd-abcdef"  # named before pids were: by age
    for folder in (killed, live, other_host, old_unnamed):
        folder.mkdir()
        (folder / "train.tokens.raw").write_bytes(b"x")
    a_day_ago = time.time() - build_folders.STALE_BUILD_S - 60
    for path in (old_unnamed, old_unnamed / "train.tokens.raw"):
        os.utime(path, (a_day_ago, a_day_ago))
    prepare_data(config(tmp_path), progress=False)
    left = {p.name for p in root.glob(".build-*")}
    assert left == {live.name, other_host.name}  # a live build and a fresh foreign one stay


def _finished_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_fingerprints_follow_content_not_location(tmp_path, corpus):
    first = prepare_data(config(tmp_path), progress=False)
    moved = shutil.copytree(corpus, tmp_path / "elsewhere" / "corpus")
    again = prepare_data(config(tmp_path, paths=[str(moved)]), progress=False)
    assert again.fingerprints == first.fingerprints and list(first.fingerprints) == ["data"]
    (corpus / "doc00.txt").write_text("changed text\n")
    changed = prepare_data(config(tmp_path), progress=False)
    assert changed.fingerprints["data"] != first.fingerprints["data"]


def test_given_tokenizer_is_used_and_checked(tmp_path, corpus):
    trained = prepare_data(config(tmp_path), progress=False)
    model = tmp_path / "tok.model"
    model.write_bytes(trained.tokenizer.model_bytes)
    data = prepare_data(config(tmp_path, tokenizer=str(model)), progress=False)
    assert data.tokenizer.model_bytes == model.read_bytes()
    assert (data.cache_dir / "tokenizer.model").read_bytes() == model.read_bytes()
    with pytest.raises(ConfigError, match="model.vocab_size=100 is smaller"):
        prepare_data(config(tmp_path, tokenizer=str(model)), model_vocab_size=100)


def test_tokenizer_bigger_than_model_fails_before_training(tmp_path, corpus):
    with pytest.raises(ConfigError, match="tokenizer_vocab_size=320 exceeds model.vocab_size=300"):
        prepare_data(config(tmp_path), model_vocab_size=300)
    assert not (tmp_path / "cache").exists()


def test_tokenize_documents_reads_any_source_through_a_given_tokenizer(tmp_path, corpus):
    model = train_tokenizer_on_documents(
        iter_documents([str(corpus / "more.jsonl")], "text"), tmp_path / "tok" / "jsonl", 300
    )
    tok = Tokenizer.load(model)
    split = tokenize_documents([str(corpus)], "text", tok)
    texts = [d.text for d in iter_documents([str(corpus)], "text")]
    assert split.n_docs == len(texts) == len(split.doc_ids())
    assert split.doc_ids()[0] == "doc00.txt"
    last = split.tokens[split.doc_offsets[-2] : split.doc_offsets[-1]].tolist()
    assert last[-1] == tok.eos_id and tok.decode(last[:-1]) == texts[-1]


def test_too_few_documents(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "one.txt").write_text("a single line")
    with pytest.raises(DataError, match="found 1 non-empty document"):
        prepare_data(config(tmp_path, doc_split="lines"), progress=False)


def test_unigram_cross_entropy_by_hand():
    # train: docs [5 6 3] [5 3] -> predicted tokens 6 3 3; val: doc [6 3] -> predicted token 3.
    train = TokenSplit("train", np.array([5, 6, 3, 5, 3], np.uint16), np.array([0, 3, 5]))
    val = TokenSplit("val", np.array([6, 3], np.uint16), np.array([0, 2]))
    vocab = 8
    p3 = (2 + 1) / (3 + vocab)
    assert unigram_cross_entropy(train, val, vocab) == pytest.approx(-math.log(p3))


def test_shakespeare_demo_corpus(tmp_path):
    paths = write_shakespeare(tmp_path / "plays")
    assert len(paths) == 38
    hamlet = (tmp_path / "plays" / "tragedies" / "hamlet.txt").read_text()
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "BERNARDO\nWho's there?\n" in hamlet
    assert not any(mark in hamlet for mark in ("**", "_", "#", "\\[", "  \n"))
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert write_shakespeare(tmp_path / "plays") == paths  # idempotent: nothing rewritten
    assert [p.stat().st_mtime_ns for p in paths] == mtimes

    cfg = DataConfig(
        paths=[str(tmp_path / "plays")], cache_dir=str(tmp_path / "cache"),
        tokenizer_vocab_size=1024,
    )  # fmt: skip
    data = prepare_data(cfg, model_vocab_size=1024, progress=False)
    assert data.train.n_docs + data.val.n_docs == 38  # documents are whole plays
    assert data.val.n_docs >= 1 and data.val.n_tokens > 50_000
    baseline = unigram_cross_entropy(data.train, data.val, data.tokenizer.vocab_size)
    assert 3.0 < baseline < math.log(data.tokenizer.vocab_size)


@pytest.mark.parametrize("name", ["book.txt", "book.txt.gz"])
def test_one_big_file_is_a_corpus_with_doc_split(tmp_path, name):
    """One large .txt (or .txt.gz), the usual way to hold a corpus: cut into paragraphs on
    its own (tests/test_one_file_corpus.py) or with data.doc_split, it gets a validation
    split."""
    import gzip

    rng = np.random.default_rng(1)
    paragraphs = [" ".join(rng.choice(WORDS, size=30)) for _ in range(40)]
    text = ("\n\n".join(paragraphs) + "\n").encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    auto = prepare_data(config(tmp_path, paths=[str(path)]), progress=False)
    assert auto.train.n_docs + auto.val.n_docs == 40
    data = prepare_data(
        config(tmp_path, paths=[str(path)], doc_split="blank_lines"), progress=False
    )
    assert data.train.n_docs + data.val.n_docs == 40 and data.val.n_docs >= 1
    assert all("#" in d for d in data.val.doc_ids())  # <file id>#<paragraph>
    # Another split rule is another cache (and another set of documents).
    lines = prepare_data(config(tmp_path, paths=[str(path)], doc_split="lines"), progress=False)
    assert lines.train.n_docs + lines.val.n_docs == 40  # the blank lines are empty documents


def test_doc_split_rules():
    from flaxlm.data.documents import Document, split_document

    doc = Document("f", "a b\nc\n\n \nd e f g h")
    assert [d.text for d in split_document(doc, "blank_lines")] == ["a b\nc", "d e f g h"]
    assert [d.doc_id for d in split_document(doc, "lines")] == [f"f#{i}" for i in range(5)]
    pieces = [d.text for d in split_document(Document("f", "aaaa bbbb cccc dd"), "chars:10")]
    assert pieces == ["aaaa bbbb ", "cccc dd"] and all(len(p) <= 10 for p in pieces)
    assert [d.text for d in split_document(Document("f", "x" * 25), "chars:10")] == [
        "x" * 10, "x" * 10, "x" * 5,
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="data.doc_split='pages' is not one of"):
        from flaxlm.config import load_config

        load_config(None, ["data.doc_split=pages"], check_paths=False)
