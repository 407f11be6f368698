"""BERT pretraining end to end: exact resume, a falling loss, eval metrics recomputed by hand
from the logits, rollback."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import bert_tiny_config

from flaxlm.data import prepare_data
from flaxlm.data.masked_batches import make_masked_batches
from flaxlm.tools.evaluate import evaluate
from flaxlm.tools.load import load_checkpoint
from flaxlm.train import train
from flaxlm.train.chaos import train_with_chaos


def _lines(run_dir):
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines() if x]


@pytest.mark.slow
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
    # It learns: the MLM loss of the last steps is well below the first ones' (measured: 5.96
    # -> 5.41, from ln 384 = 5.95).
    mlm_losses = [r["mlm_loss"] for r in straight.history]
    assert np.mean(mlm_losses[-3:]) < np.mean(mlm_losses[:3]) - 0.3, mlm_losses

    # flaxlm eval's figures, and those of the evaluation at the end of training (the run's
    # eval_batches = 4 of its validation split), recomputed with NumPy from the model's logits
    report = evaluate(tmp_path / "a", max_batches=4, batch_size=8)
    want = _bert_metrics_by_hand(tmp_path / "a", n_batches=4, batch_size=8)
    assert report["step"] == 12 and report["tokens"] == want["mlm_tokens"]
    for key in ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"):
        assert report[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
        assert straight.evals[-1][key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert report["val_loss"] == pytest.approx(want["mlm_loss"] + want["nsp_loss"], rel=1e-5)
    # the baseline: always the most frequent train token, at the same masked positions
    assert report["mlm_frequency_accuracy"] == pytest.approx(want["mlm_frequency_accuracy"])
    assert report["mlm_unigram_loss"] < np.log(384)  # the unigram beats the uniform guess


def _bert_metrics_by_hand(run_dir, n_batches: int, batch_size: int) -> dict[str, float]:
    """MLM / NSP loss and accuracy of the run's newest checkpoint on the first ``n_batches``
    of its validation split, from the model's logits with plain NumPy; and the accuracy of
    always guessing the train split's most frequent ordinary token."""
    loaded = load_checkpoint(run_dir)
    cfg, tok = loaded.cfg, loaded.tokenizer
    data = prepare_data(cfg.data, cfg.model.vocab_size, False, tok)
    batches = make_masked_batches(data.val, cfg, tok, batch_size, shuffle=False)
    counts = np.bincount(np.asarray(data.train.tokens), minlength=tok.vocab_size)
    specials = [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.cls_id, tok.sep_id,
                tok.mask_id]  # fmt: skip
    counts[[i for i in specials if i is not None]] = 0
    sums = dict.fromkeys(("mlm_ce", "mlm_correct", "mlm_n", "nsp_ce", "nsp_correct", "nsp_n",
                          "frequent"), 0.0)  # fmt: skip
    apply = jax.jit(loaded.model.apply)
    for batch in batches.eval_batches(batch_size, n_batches):
        out = apply(
            {"params": loaded.params}, batch["inputs"], batch["positions"], batch["segment_ids"],
            batch["token_types"], batch["masked_positions"],
        )  # fmt: skip
        for name, logits, labels, weights in (
            ("mlm", out["mlm_logits"], batch["masked_ids"], batch["masked_weights"]),
            ("nsp", out["nsp_logits"][:, None], batch["nsp_labels"], batch["nsp_weights"]),
        ):
            logits = np.asarray(logits, np.float64)
            top = logits.max(-1, keepdims=True)
            log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
            picked = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
            sums[f"{name}_ce"] += np.sum((log_z - picked) * weights)
            sums[f"{name}_correct"] += np.sum((logits.argmax(-1) == labels) * weights)
            sums[f"{name}_n"] += np.sum(weights)
        real = batch["masked_weights"] > 0
        sums["frequent"] += np.sum(batch["masked_ids"][real] == np.argmax(counts))
    return {
        "mlm_loss": sums["mlm_ce"] / sums["mlm_n"],
        "mlm_accuracy": sums["mlm_correct"] / sums["mlm_n"],
        "mlm_tokens": sums["mlm_n"],
        "nsp_loss": sums["nsp_ce"] / sums["nsp_n"],
        "nsp_accuracy": sums["nsp_correct"] / sums["nsp_n"],
        "mlm_frequency_accuracy": sums["frequent"] / sums["mlm_n"],
    }


def test_nan_in_a_bert_step_rolls_back(small_corpus, tiny_cache_dir, tmp_path):
    cfg = bert_tiny_config(
        small_corpus, tiny_cache_dir, tmp_path / "r", "train.steps=10", "checkpoint.every=4",
        "train.eval_every=0", "chaos.nan_at_steps=[7]", "guard.known_good_after=2",
    )  # fmt: skip
    result = train_with_chaos(cfg)
    assert result.step == 10 and len(result.rollbacks) == 1
    assert result.rollbacks[0]["step"] == 7
    assert result.rollbacks[0]["restored_step"] == 4  # known good since step 6
    assert all(np.isfinite(r["loss"]) for r in result.history if r["step"] != 7)
