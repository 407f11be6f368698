"""Seq2seq batches: span corruption of real text and packed pairs, against references; the
batch of step k a pure function of (seed, k); pairs read from CSV / JSONL."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_config

from flaxlm.data import prepare_data
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.seq2seq_batches import (
    SEQ2SEQ_KEYS,
    PairBatches,
    SpanCorruptionBatches,
    encode_pair,
    pack_pairs,
)
from flaxlm.data.sources import DataError
from flaxlm.data.span_corruption import raw_and_target_len

SEQ = 64


@pytest.fixture(scope="module")
def prepared(small_corpus, tiny_cache_dir, tmp_path_factory):
    cfg = tiny_config(small_corpus, tiny_cache_dir, tmp_path_factory.mktemp("s2s"))
    return prepare_data(cfg.data, cfg.model.vocab_size, progress=False)


def _span_batches(prepared, seed=0, batch=8, **kw):
    target = raw_and_target_len(SEQ, 0.15, 3.0)[1]
    return SpanCorruptionBatches(prepared.train, SEQ, target, batch, seed, prepared.tokenizer, **kw)


def _segments_rebuild(batch, row, vocab):
    """The raw run of a span-corruption row: each sentinel of the encoder row replaced by the
    target tokens after it (a plain-Python inverse of the corruption)."""
    enc = batch["encoder_ids"][row][batch["encoder_segment_ids"][row] > 0].tolist()
    tgt = batch["decoder_target_ids"][row][batch["decoder_segment_ids"][row] > 0].tolist()
    spans, current = {}, None
    for t in tgt[:-1]:
        if t >= vocab:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    return [x for t in enc[:-1] for x in (spans[t] if t >= vocab else [t])]


def test_span_rows_hold_the_raw_runs_of_their_examples(prepared):
    batches = _span_batches(prepared)
    vocab = prepared.tokenizer.vocab_size
    batch = batches.batch(3)
    assert set(batch) == set(SEQ2SEQ_KEYS)
    ids = batches.example_ids(np.arange(24, 32))
    tokens = np.asarray(prepared.train.tokens)
    for row, i in enumerate(ids):
        run = tokens[i * batches.raw_len : (i + 1) * batches.raw_len].tolist()
        assert _segments_rebuild(batch, row, vocab) == run
        # T5: the first target token is the highest sentinel, inputs end in </s>.
        assert batch["decoder_target_ids"][row, 0] == vocab + 99
        last = batch["encoder_segment_ids"][row].sum() - 1
        assert batch["encoder_ids"][row, last] == prepared.tokenizer.eos_id
    # Decoder inputs: targets shifted right, starting with the pad id.
    shifted = np.concatenate([np.zeros((8, 1), np.int32), batch["decoder_target_ids"][:, :-1]], 1)
    real = batch["decoder_loss_mask"] > 0
    assert np.array_equal(batch["decoder_input_ids"][real], shifted[real])
    assert np.array_equal(batch["decoder_loss_mask"] > 0, batch["decoder_segment_ids"] > 0)


def test_span_batches_are_a_pure_function_of_seed_and_step(prepared):
    a, b = _span_batches(prepared), _span_batches(prepared)
    for step in (5, 0, 5, 200):  # any order, any instance, past the first epoch
        x, y = a.batch(step), b.batch(step)
        assert all(np.array_equal(x[k], y[k]) for k in SEQ2SEQ_KEYS)
    halves = [a.batch(5, p, 2) for p in range(2)]
    for k in SEQ2SEQ_KEYS:
        assert np.array_equal(np.concatenate([h[k] for h in halves]), a.batch(5)[k])
    other = _span_batches(prepared, seed=1).batch(5)
    assert not np.array_equal(other["encoder_ids"], a.batch(5)["encoder_ids"])
    # A ramp: the same global rows, whatever batch they land in.
    ramp = BatchRamp.or_constant(None, 8)
    assert np.array_equal(_span_batches(prepared, ramp=ramp).batch(2)["encoder_ids"],
                          a.batch(2)["encoder_ids"])  # fmt: skip


def test_one_epoch_visits_every_run_once(prepared):
    batches = _span_batches(prepared, batch=16)
    n = batches.n_examples
    seen = batches.example_ids(np.arange(n))
    assert sorted(seen.tolist()) == list(range(n))
    # Same run, another epoch: another noise mask.
    first = batches.build(np.array([0]))["encoder_ids"]
    again = batches.build(np.array([n + np.flatnonzero(batches.example_ids(np.arange(n, 2 * n))
                                                       == seen[0])[0]]))["encoder_ids"]  # fmt: skip
    assert not np.array_equal(first, again)


def test_target_len_too_short(prepared):
    with pytest.raises(Exception, match="seq2seq.target_len=5 is too short"):
        SpanCorruptionBatches(prepared.train, SEQ, 5, 8, 0, prepared.tokenizer)


def _reference_rows(examples, seq_len, target_len):
    """Next fit with plain lists: (encoder ids, encoder segments, decoder inputs, segments)."""
    rows, cur = [], None
    for enc, tgt in examples:
        if cur is None or len(cur[0]) + len(enc) > seq_len or len(cur[2]) + len(tgt) > target_len:
            cur = ([], [], [], [])
            rows.append(cur)
        seg = (cur[1][-1] if cur[1] else 0) + 1
        cur[0].extend(enc)
        cur[1].extend([seg] * len(enc))
        cur[2].extend([0] + list(tgt[:-1]))
        cur[3].extend([seg] * len(tgt))
    return rows


def test_pairs_pack_as_the_reference(prepared):
    rng = np.random.default_rng(0)
    examples = [
        encode_pair(rng.integers(7, 100, rng.integers(1, 30)).tolist(),
                    rng.integers(7, 100, rng.integers(0, 12)).tolist(), 32, 16, eos_id=3)
        for _ in range(100)
    ]  # fmt: skip
    batches = PairBatches(examples, 32, 16, 4, seed=0, shuffle=False)
    ref = _reference_rows(examples, 32, 16)
    assert len(pack_pairs(examples, 32, 16)) == len(ref) == batches.n_examples
    got = next(batches.eval_batches(len(ref)))
    for r, (enc, eseg, dec_in, dseg) in enumerate(ref):
        assert got["encoder_ids"][r, : len(enc)].tolist() == enc
        assert got["encoder_segment_ids"][r].tolist() == eseg + [0] * (32 - len(enc))
        assert got["decoder_input_ids"][r, : len(dec_in)].tolist() == dec_in
        assert got["decoder_segment_ids"][r].tolist() == dseg + [0] * (16 - len(dseg))
        starts = np.flatnonzero(np.diff(np.array(eseg), prepend=0))
        assert all(got["encoder_positions"][r, s] == 0 for s in starts)


def test_encode_pair_truncates_inputs_and_refuses_long_targets():
    enc, tgt = encode_pair(list(range(10, 50)), [9, 9], 16, 8, eos_id=3)
    assert enc.tolist() == list(range(10, 25)) + [3] and tgt.tolist() == [9, 9, 3]
    with pytest.raises(ValueError, match=r"data.csv row 4: target of 8 tokens .*target_len=8"):
        encode_pair([5], [9] * 8, 16, 8, eos_id=3, where="data.csv row 4")


def test_read_pairs_csv_jsonl_and_errors(tmp_path):
    from flaxlm.data.seq2seq_pairs import read_pairs

    csv_path = tmp_path / "p.csv"
    csv_path.write_text('src,tgt\n"hello, world",hi\nfoo,bar\n')
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"src": "hello, world", "tgt": "hi"}\n\n{"src": "foo", "tgt": "bar"}\n')
    for path in (csv_path, jsonl):
        rows = read_pairs(path, "src", "tgt")
        assert [(r.input, r.target) for r in rows] == [("hello, world", "hi"), ("foo", "bar")]
    with pytest.raises(DataError, match=r"p.csv row 1: no column 'input' \(columns: src, tgt\)"):
        read_pairs(csv_path, "input", "tgt")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="e.jsonl holds no rows"):
        read_pairs(tmp_path / "e.jsonl", "src", "tgt")
    (tmp_path / "b.jsonl").write_text(json.dumps({"src": "x", "tgt": " "}) + "\n")
    with pytest.raises(DataError, match="b.jsonl row 1: empty target in column 'tgt'"):
        read_pairs(tmp_path / "b.jsonl", "src", "tgt")
