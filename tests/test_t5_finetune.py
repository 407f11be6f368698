"""Seq2seq fine-tuning (``flaxlm finetune`` on a t5 run): it learns a small set of pairs, its
exact match is what the saved run generates, its baselines are the plain-Python ones, and
bad input fails in one line."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import linen as nn
from test_commands import cli

from flaxlm.config import ConfigError, load_config
from flaxlm.data.seq2seq_pairs import PairRow, plain_form, write_shakespeare_pairs
from flaxlm.families import build_model
from flaxlm.tools.generate import generate
from flaxlm.tools.load import LoadedModel, load_checkpoint, save_params_checkpoint
from flaxlm.tools.seq2seq_finetune import baselines, finetune_seq2seq

LINES = [
    "To be, or not to be,",
    "Good night, sweet prince:",
    "O Romeo, Romeo!",
    "Lord, what fools!",
    "I am a man,",
    "All the world's a stage,",
    "Cry havoc!",
    "Et tu, Brute?",
]


@pytest.fixture(scope="module")
def t5_run(small_corpus, tmp_path_factory):
    """A t5_tiny checkpoint of random weights with a tokenizer of the corpus (no training:
    the fine-tune is what is tested)."""
    from flaxlm.tokenizers.sentencepiece import Tokenizer, train_tokenizer

    tmp = tmp_path_factory.mktemp("t5_ft")
    tok = Tokenizer.load(train_tokenizer(sorted(small_corpus.iterdir())[:2], tmp / "tok", 384))
    cfg = load_config(REPO / "configs" / "t5_tiny.yaml", [f"data.paths=[{small_corpus}]"])
    model = build_model(cfg.model)
    init = jax.jit(model.init)
    params = nn.meta.unbox(init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    save_params_checkpoint(tmp / "run", cfg, params, tok, step=0)
    return tmp / "run"


def _write(path, rows, header=("input", "target", "play")):
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


@pytest.mark.slow
def test_finetune_learns_pairs_and_reports_what_the_run_generates(t5_run, tmp_path):
    data = _write(tmp_path / "pairs.csv", [(plain_form(x), x, "p") for x in LINES])
    out = tmp_path / "ft"
    code, printed, err = cli(
        "finetune", t5_run, "--data", data, "--val-data", data, "--epochs", 100,
        "--batch-size", 4, "--lr", 1e-2, "--dropout", 0, "--out", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(printed)
    # Validation = the training pairs: the model must have learnt them (from random weights).
    assert report["exact_match"] >= 0.75 > report["baseline"]
    assert (report["copy_baseline"], report["majority_baseline"]) == (0.0, 1 / 8)
    assert "epoch 100/100: train loss" in err
    # The result is a run: generating from it gives the reported exact match.
    loaded = load_checkpoint(out)
    n = report["max_new_tokens"]  # the longest target + </s>
    answers = generate(loaded, [plain_form(x) for x in LINES], max_new_tokens=n)
    hits = [a.strip() == x for a, x in zip(answers, LINES, strict=True)]
    assert report["exact_match"] == sum(hits) / 8
    meta = json.loads((out / "seq2seq.json").read_text())
    assert meta["report"]["exact_match"] == report["exact_match"]


def test_baselines_are_copy_and_majority():
    train = [PairRow("a", "x", "g", ""), PairRow("b", "x", "g", ""), PairRow("c", "y", "g", "")]
    val = [PairRow("x", "x", "h", ""), PairRow("d", "x", "h", ""), PairRow("e", "e", "h", ""),
           PairRow("f", "g", "h", "")]  # fmt: skip
    got = baselines(train, val)
    assert got["copy_baseline"] == 2 / 4 and got["majority_target"] == "x"
    assert got["majority_baseline"] == 2 / 4 and got["baseline"] == 0.5


def test_bad_input_is_one_line(t5_run, tmp_path):
    data = _write(tmp_path / "p.csv", [("a b", "A b.", "p")] * 4)
    code, _, err = cli("finetune", t5_run, "--data", data, "--input-column", "source")
    assert code == 2 and "no column 'source' (columns: input, target, play)" in err
    long = _write(tmp_path / "long.csv", [("a", "word " * 40, "p")] * 4)
    code, _, err = cli("finetune", t5_run, "--data", long, "--val-data", long,
                       "--target-len", 8)  # fmt: skip
    assert code == 2 and "long.csv row 1: target of" in err and "target_len=8" in err
    assert len(err.strip().splitlines()) == 1
    gpt = load_config(REPO / "configs" / "gpt_tiny.yaml", [])
    not_t5 = LoadedModel(gpt, None, None, None, 0, None, None, {})
    with pytest.raises(ConfigError, match="needs an encoder-decoder .* model.family='gpt'"):
        finetune_seq2seq(not_t5, data)


def test_demo_set_is_real_lines_with_their_plain_form(tmp_path):
    path = write_shakespeare_pairs(tmp_path / "d.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) > 50_000 and len({r["play"] for r in rows}) == 38
    assert {"input": "something is rotten in the state of denmark",
            "target": "Something is rotten in the state of Denmark.",
            "play": "tragedies/hamlet"} in rows  # fmt: skip
    assert all(r["input"] == plain_form(r["target"]) and 4 <= len(r["target"].split()) <= 8
               for r in rows)  # fmt: skip
    assert not any(r["target"].startswith(("SCENE", "ACT ", "Enter", "Exit")) for r in rows)


def test_packed_rows_score_as_separate_rows(t5_run):
    """The model reads the batches' segment ids as meant: each target token's loss is the same
    whether its pair shares a row with others (packed) or has a row to itself."""
    from flaxlm.data.seq2seq_batches import PairBatches, encode_pair

    loaded = load_checkpoint(t5_run)
    rng = np.random.default_rng(0)
    examples = [
        encode_pair(rng.integers(7, 380, rng.integers(2, 9)).tolist(),
                    rng.integers(7, 380, rng.integers(1, 6)).tolist(), 32, 16, eos_id=3)
        for _ in range(12)
    ]  # fmt: skip
    packed = next(PairBatches(examples, 32, 16, 4, 0, shuffle=False).eval_batches(4))
    alone = next(PairBatches(examples, 32, 16, 12, 0, pack=False, shuffle=False).eval_batches(12))
    assert packed["encoder_segment_ids"].max() > 1

    @jax.jit
    def losses(b):
        logits = loaded.model.apply(
            {"params": loaded.params}, b["encoder_ids"], b["decoder_input_ids"],
            b["encoder_segment_ids"], b["decoder_segment_ids"], b["encoder_positions"],
            b["decoder_positions"],
        )  # fmt: skip
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, b["decoder_target_ids"][..., None], axis=-1)[..., 0]

    def token_losses(b):
        return np.asarray(losses(b))[b["decoder_loss_mask"] > 0]  # row-major: pairs in order

    np.testing.assert_allclose(token_losses(packed), token_losses(alone), atol=1e-5)
