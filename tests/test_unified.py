"""The unified objective: per-example MLM / causal / prefix-LM rows, masks and losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import bert_tiny_config

from flaxlm.data import prepare_data
from flaxlm.data.masked import make_masked_batches
from flaxlm.train import train

UNIFIED = ("objective.nsp=false", "objective.mlm=0.4", "objective.causal=0.3",
           "objective.prefix_lm=0.3")  # fmt: skip


@pytest.fixture(scope="module")
def prepared(small_corpus, tiny_cache_dir, tmp_path_factory):
    cfg = bert_tiny_config(small_corpus, tiny_cache_dir, tmp_path_factory.mktemp("u"), *UNIFIED)
    return cfg, prepare_data(cfg.data, cfg.model.vocab_size, progress=False)


def test_unified_rows_follow_their_objective(prepared):
    cfg, data = prepared
    tok = data.tokenizer
    batches = make_masked_batches(data.train, cfg, tok, global_batch=1000)
    rows = batches.batch(0)
    obj, prefix = rows["objective_ids"][:, 0], rows["prefix_len"][:, 0]
    shares = np.bincount(obj, minlength=3) / len(obj)
    np.testing.assert_allclose(shares, [0.4, 0.3, 0.3], atol=0.05)
    S = cfg.data.seq_len
    assert (prefix[obj == 0] == S).all() and (prefix[obj == 1] == 0).all()
    assert ((prefix[obj == 2] >= 1) & (prefix[obj == 2] < S)).all()

    plain = make_masked_batches(data.train, cfg, tok, 1000).build(np.arange(1000))
    same = plain["inputs"] == rows["inputs"]
    cols = np.arange(S)[None, :]
    for r in np.flatnonzero(obj != 0):  # causal / prefix rows: unmasked, next-token targets
        assert same[r].all()
        lm = rows["loss_mask"][r]
        assert (lm[cols[0] < prefix[r] - 1] == 0).all()  # no loss inside the prefix
    mlm = np.flatnonzero(obj == 0)
    predicted = rows["loss_mask"][mlm] > 0
    share = predicted.sum() / (rows["inputs"][mlm] != tok.eos_id).sum()
    assert abs(share - 0.15) < 0.02
    assert (rows["inputs"][mlm][predicted] == tok.mask_id).mean() > 0.7
    # MLM rows predict the original token in place.
    original = np.asarray(data.train.tokens)  # the row's text, recovered from the packing
    ids = batches.example_ids(np.arange(1000))
    for r in mlm[:20]:
        start = ids[r] * S
        np.testing.assert_array_equal(
            rows["targets"][r][predicted[list(mlm).index(r)]],
            original[start : start + S][predicted[list(mlm).index(r)]],
        )


def test_unified_training_logs_each_objective(prepared, small_corpus, tiny_cache_dir, tmp_path):
    cfg = bert_tiny_config(
        small_corpus, tiny_cache_dir, tmp_path / "run", *UNIFIED, "train.steps=8",
        "train.eval_every=4", "train.batch_size=16", "train.grad_accum=2",
    )  # fmt: skip
    result = train(cfg)
    assert result.step == 8
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
               if x]  # fmt: skip
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 8 and all(np.isfinite(r["loss"]) for r in steps)
    for key in ("mlm_loss", "causal_loss", "prefix_lm_loss"):
        assert any(key in r for r in steps), key
        assert key in result.evals[-1], key
    assert steps[-1]["loss"] < steps[0]["loss"]
