"""The unified objective: per-example MLM / causal / prefix-LM rows, masks and losses."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import bert_tiny_config

from flaxlm.data import prepare_data
from flaxlm.data.masked_batches import OBJECTIVES, make_masked_batches
from flaxlm.tools.evaluate import evaluate
from flaxlm.tools.load import load_checkpoint
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
    # every objective learns (measured: each from ~5.96 = ln 384 down to ~5.38 in 8 steps),
    # on the train batches and on the validation split (evaluated at steps 4 and 8)
    first, last = steps[0], steps[-1]
    assert [e["step"] for e in result.evals] == [4, 8]
    for key in ("loss", "mlm_loss", "causal_loss", "prefix_lm_loss"):
        assert last[key] < first[key] - 0.3, (key, first, last)
        if key != "loss":
            assert result.evals[1][key] < result.evals[0][key] - 0.2, (key, result.evals)
    # flaxlm eval's per-objective losses, recomputed with NumPy from the model's logits
    report = evaluate(tmp_path / "run", max_batches=2, batch_size=8)
    want = _objective_losses_by_hand(tmp_path / "run", n_batches=2, batch_size=8)
    assert set(want) == {"mlm_loss", "causal_loss", "prefix_lm_loss", "val_loss"}
    for key, value in want.items():
        assert report[key] == pytest.approx(value, rel=1e-5), key


def _objective_losses_by_hand(run_dir, n_batches: int, batch_size: int) -> dict[str, float]:
    """Each objective's mean token cross-entropy, and the share-weighted total, of the run's
    newest checkpoint on the first ``n_batches`` of its validation split, with plain NumPy
    from the model's logits."""
    loaded = load_checkpoint(run_dir)
    cfg, tok = loaded.cfg, loaded.tokenizer
    data = prepare_data(cfg.data, cfg.model.vocab_size, False, tok)
    batches = make_masked_batches(data.val, cfg, tok, batch_size, shuffle=False)
    apply = jax.jit(loaded.model.apply, static_argnames="with_nsp")
    ce_sum, tokens = np.zeros(3), np.zeros(3)  # mlm, causal, prefix_lm
    for batch in batches.eval_batches(batch_size, n_batches):
        logits = apply(
            {"params": loaded.params}, batch["inputs"], batch["positions"], batch["segment_ids"],
            prefix_len_B=batch["prefix_len"][:, 0], with_nsp=False,
        )["mlm_logits"]  # fmt: skip
        logits = np.asarray(logits, np.float64)
        top = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        ce = log_z - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        for row, objective in enumerate(batch["objective_ids"][:, 0]):
            ce_sum[objective] += np.sum(ce[row] * batch["loss_mask"][row])
            tokens[objective] += np.sum(batch["loss_mask"][row])
    losses = ce_sum / np.maximum(tokens, 1)
    shares = np.array([0.4, 0.3, 0.3]) * (tokens > 0)
    out = {
        f"{name}_loss": loss for name, loss, n in zip(OBJECTIVES, losses, tokens, strict=True) if n
    }
    out["val_loss"] = float(np.sum(shares * losses) / shares.sum())
    return out
