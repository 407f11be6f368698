"""NSP pairs: [CLS] A [SEP] B [SEP], half of the Bs random and never from A's document."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bert_tiny_config

from flaxlm.data import prepare_data
from flaxlm.data.pairs import PairChunks, build_pairs


@pytest.fixture(scope="module")
def prepared(small_corpus, tiny_cache_dir, tmp_path_factory):
    cfg = bert_tiny_config(small_corpus, tiny_cache_dir, tmp_path_factory.mktemp("p"))
    return prepare_data(cfg.data, cfg.model.vocab_size, progress=False)


def test_pairs_layout_labels_and_random_documents(prepared):
    tok, split = prepared.tokenizer, prepared.train
    chunks = PairChunks(split, seq_len=64)
    ids = np.arange(len(chunks))[:4000]
    rows = build_pairs(chunks, ids, ids, 0, tok.cls_id, tok.sep_id, tok.pad_id)
    labels = rows["nsp_labels"][:, 0]
    assert abs(labels.mean() - 0.5) < 0.03, labels.mean()

    stream = np.asarray(split.tokens)
    for r in range(len(ids)):
        inputs, types, seg = rows["inputs"][r], rows["token_types"][r], rows["segment_ids"][r]
        real = int(seg.sum())
        assert (seg[:real] == 1).all() and (seg[real:] == 0).all()
        assert (inputs[real:] == tok.pad_id).all() and (types[real:] == 0).all()
        seps = np.flatnonzero(inputs[:real] == tok.sep_id)
        assert inputs[0] == tok.cls_id and len(seps) == 2 and seps[1] == real - 1
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : real] == 1).all()
        np.testing.assert_array_equal(rows["positions"][r, :real], np.arange(real))
        a, b = inputs[1 : seps[0]], inputs[seps[0] + 1 : real - 1]
        assert len(a) >= 1 and 1 + len(a) + 1 + len(b) + 1 <= 64
        start, doc = int(chunks.starts[ids[r]]), int(chunks.docs[ids[r]])
        np.testing.assert_array_equal(a, stream[start : start + len(a)])
        if labels[r] == 0:  # the true continuation
            np.testing.assert_array_equal(b, stream[start + len(a) : start + len(a) + len(b)])
        else:  # a span of another document
            other = int(rows["random_doc"][r, 0])
            assert other != doc
            lo, hi = split.doc_offsets[other], split.doc_offsets[other + 1]
            window = stream[lo:hi]
            found = np.flatnonzero(window[: len(window) - len(b) + 1] == b[0])
            assert any((window[i : i + len(b)] == b).all() for i in found)


def test_pairs_are_a_function_of_seed_and_index(prepared):
    tok, chunks = prepared.tokenizer, PairChunks(prepared.train, seq_len=64)
    ids = np.arange(50)
    a = build_pairs(chunks, ids, ids, 0, tok.cls_id, tok.sep_id, tok.pad_id)
    b = build_pairs(chunks, ids[::-1], ids[::-1], 0, tok.cls_id, tok.sep_id, tok.pad_id)
    np.testing.assert_array_equal(a["inputs"], b["inputs"][::-1])
    c = build_pairs(chunks, ids, ids + 10_000, 0, tok.cls_id, tok.sep_id, tok.pad_id)
    assert (a["inputs"] != c["inputs"]).any(axis=1).mean() > 0.5


def test_a_one_document_split_draws_random_segments_far_from_a(prepared):
    tok = prepared.tokenizer
    chunks = PairChunks(prepared.train.documents(0, 1), seq_len=64)
    ids = np.arange(min(len(chunks), 300))
    rows = build_pairs(chunks, ids, ids, 0, tok.cls_id, tok.sep_id, tok.pad_id)
    assert 0.35 < rows["nsp_labels"].mean() < 0.65
