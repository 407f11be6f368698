"""BERT pretraining end to end: MLM + NSP metrics, exact resume, rollback, eval contract."""

from __future__ import annotations

import json

import numpy as np
from conftest import bert_tiny_config

from flaxlm.tools.evaluate import evaluate
from flaxlm.train import train


def _lines(run_dir):
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines() if x]


def test_bert_run_resumes_bit_for_bit_and_evaluates(small_corpus, tiny_cache_dir, tmp_path):
    overrides = ("train.steps=12", "checkpoint.every=4", "model.dropout=0.1", "train.eval_every=0")
    straight = train(bert_tiny_config(small_corpus, tiny_cache_dir, tmp_path / "a", *overrides))
    resumed_dir = tmp_path / "b"
    first = train(
        bert_tiny_config(small_corpus, tiny_cache_dir, resumed_dir, *overrides), stop_at_step=6
    )
    second = train(bert_tiny_config(small_corpus, tiny_cache_dir, resumed_dir, *overrides))
    assert second.resumed_from == 6
    for key in ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy"):
        np.testing.assert_array_equal(
            [r[key] for r in straight.history], [r[key] for r in first.history + second.history]
        )
    lines = _lines(resumed_dir)
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 13))
    assert straight.evals[-1]["mlm_accuracy"] >= 0

    report = evaluate(tmp_path / "a", max_batches=2)  # the Contract keys of flaxlm eval
    for key in ("mlm_loss", "mlm_accuracy", "nsp_accuracy", "val_loss", "step"):
        assert key in report, key
    assert 0 <= report["mlm_accuracy"] <= 1 and report["step"] == 12
    assert "mlm_frequency_accuracy" in report and "mlm_unigram_loss" in report


def test_nan_in_a_bert_step_rolls_back(small_corpus, tiny_cache_dir, tmp_path):
    cfg = bert_tiny_config(
        small_corpus, tiny_cache_dir, tmp_path / "r", "train.steps=10", "checkpoint.every=4",
        "train.eval_every=0", "chaos.nan_at_steps=[7]",
    )  # fmt: skip
    result = train(cfg)
    assert result.step == 10 and len(result.rollbacks) == 1
    assert result.rollbacks[0]["step"] == 7
    assert all(np.isfinite(r["loss"]) for r in result.history if r["step"] != 7)
