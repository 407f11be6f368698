"""BERT masking: 15 % chosen, 80/10/10, specials never chosen, whole words, resumable masks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bert_tiny_config

from flaxlm.data import prepare_data
from flaxlm.data.masked_batches import make_masked_batches
from flaxlm.data.mlm_masks import MaskingSpec, ObjectiveConfig, mask_batch, word_ids


@pytest.fixture(scope="module")
def prepared(small_corpus, tiny_cache_dir, tmp_path_factory):
    cfg = bert_tiny_config(small_corpus, tiny_cache_dir, tmp_path_factory.mktemp("m"))
    return cfg, prepare_data(cfg.data, cfg.model.vocab_size, progress=False)


def _rows(prepared, n_rows=2000, length=128, seed=0):
    """Windows of real text with specials sprinkled in: [CLS] at 0, [SEP], </s>, padding."""
    _, data = prepared
    tok = data.tokenizer
    rng = np.random.default_rng(seed)
    stream = np.asarray(data.train.tokens)
    starts = rng.integers(0, len(stream) - length, n_rows)
    rows = stream[starts[:, None] + np.arange(length)].astype(np.int32)
    rows[:, 0] = tok.cls_id
    rows[:, 60] = tok.sep_id
    rows[:, -8:] = tok.pad_id
    return rows


def _spec(prepared, **kw):
    _, data = prepared
    return MaskingSpec.from_tokenizer(data.tokenizer, ObjectiveConfig(**kw), seq_len=128)


def test_masking_statistics(prepared):
    _, data = prepared
    tok = data.tokenizer
    rows = _rows(prepared)
    spec = _spec(prepared)
    out = mask_batch(rows, np.arange(len(rows)), spec, seed=0)
    w = out["masked_weights"] > 0
    pos, ids = out["masked_positions"][w], out["masked_ids"][w]
    row_of = np.nonzero(w)[0]
    assert (rows[row_of, pos] == ids).all()  # the targets are the original tokens

    n_candidates = (~spec.is_special[rows]).sum()
    assert abs(w.sum() / n_candidates - 0.15) < 0.01
    assert not spec.is_special[ids].any()  # specials and padding are never chosen
    assert w.sum(axis=1).max() <= spec.max_predictions == 20

    seen = out["inputs"][row_of, pos]
    to_mask = np.mean(seen == tok.mask_id)
    unchanged = np.mean(seen == ids)
    to_random = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.02, (to_mask, unchanged)
    assert abs(to_random - 0.1) < 0.02
    assert not spec.is_special[seen[(seen != tok.mask_id) & (seen != ids)]].any()
    # Everything not chosen is passed through untouched.
    untouched = np.ones(rows.shape, bool)
    untouched[row_of, pos] = False
    assert (out["inputs"][untouched] == rows[untouched]).all()


def test_whole_word_masking_takes_every_piece_of_a_word(prepared):
    rows = _rows(prepared, n_rows=300)
    spec = _spec(prepared, whole_word=True)
    out = mask_batch(rows, np.arange(len(rows)), spec, seed=3)
    n_multi = 0
    for r in range(len(rows)):
        candidates = ~spec.is_special[rows[r]]
        positions = np.flatnonzero(candidates)
        words = word_ids(rows[r], candidates, spec)
        chosen = set(out["masked_positions"][r][out["masked_weights"][r] > 0].tolist())
        for word in np.unique(words[np.isin(positions, list(chosen))]):
            pieces = set(positions[words == word].tolist())
            assert pieces <= chosen, (r, word)
            n_multi += len(pieces) > 1
    assert n_multi > 50  # the corpus does have multi-piece words, and they were masked whole
    w = out["masked_weights"] > 0
    assert abs(w.sum() / (~spec.is_special[rows]).sum() - 0.15) < 0.01


def test_masks_are_a_function_of_seed_and_example_index(prepared):
    rows = _rows(prepared, n_rows=16)
    spec = _spec(prepared)
    a = mask_batch(rows, np.arange(16), spec, seed=0)
    b = mask_batch(rows[8:], np.arange(8, 16), spec, seed=0)  # other rows around it
    np.testing.assert_array_equal(a["inputs"][8:], b["inputs"])
    c = mask_batch(rows, np.arange(16) + 1000, spec, seed=0)  # same text, later epoch
    assert (a["masked_positions"] != c["masked_positions"]).any(axis=1).all()


def test_batches_repeat_exactly_on_resume_and_differ_across_epochs(prepared):
    cfg, data = prepared
    batches = make_masked_batches(data.train, cfg, data.tokenizer, global_batch=8)
    late = batches.batch(7)
    fresh = make_masked_batches(data.train, cfg, data.tokenizer, global_batch=8)
    for step in (7, 3, 7):  # any order, any instance: the same bytes
        again = fresh.batch(step)
        if step == 7:
            for key in late:
                np.testing.assert_array_equal(late[key], again[key])
    # Two processes build their halves of the same global batch.
    halves = [fresh.batch(7, p, 2) for p in range(2)]
    for key in late:
        np.testing.assert_array_equal(late[key], np.concatenate([h[key] for h in halves]))
    # The same example in the next epoch: same chunk of text, different pair / mask.
    n = batches.n_examples
    g = 7 * 8 + np.arange(8)
    ex = batches.example_ids(g)
    g_next = np.array([n + int(np.flatnonzero(batches.example_ids(n + np.arange(n)) == e)[0])
                       for e in ex])  # fmt: skip
    np.testing.assert_array_equal(batches.example_ids(g_next), ex)
    first, second = batches.build(g), batches.build(g_next)
    assert (first["masked_positions"] != second["masked_positions"]).any()
