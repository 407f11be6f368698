"""Task scoring on the encoder-decoder family (flaxlm/tasks/seq2seq.py, ``TaskScoring`` kind
``seq2seq``): batched, padded log-likelihoods against the model applied to one unpadded
example, multiple-choice metrics against the argmax of those, rolling windows, generation
against an uncached argmax, one-line errors.

The model is configs/t5_tiny.yaml with random weights: agreement needs no trained model.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import linen as nn

from flaxlm.config import load_config
from flaxlm.families import build_model
from flaxlm.families.t5 import decode_with_sentinels
from flaxlm.parallel.sharding import build_mesh
from flaxlm.tasks import Scorer, TaskError, TaskSuite
from flaxlm.tasks.scorer import rolling_windows

TOKENIZER_VOCAB = 384
WINDOW = 16  # the scorer's max_length: long contexts are cut to exactly this many tokens
PASSAGE = (
    "Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day, "
    "to the last syllable of recorded time; and all our yesterdays have lighted fools "
    "the way to dusty death. Out, out, brief candle! Life's but a walking shadow."
)


@pytest.fixture(scope="module")
def t5(small_corpus, tmp_path_factory):
    """A loaded-model stand-in: t5_tiny with random weights (norm scales 1 + noise), made in
    NumPy from the parameter shapes (no compile)."""
    from flaxlm.tokenizers.sentencepiece import Tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    tok = Tokenizer.load(train_tokenizer(sorted(small_corpus.iterdir())[:1], out, TOKENIZER_VOCAB))
    cfg = load_config(REPO / "configs" / "t5_tiny.yaml", ["model.n_layers=1"])  # fast compiles
    model = build_model(cfg.model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    leaves, tree = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(shapes)["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [
        (float("scale" in jax.tree_util.keystr(p)) + 0.2 * rng.standard_normal(x.shape))
        .astype(np.float32) for p, x in leaves
    ])  # fmt: skip
    return SimpleNamespace(cfg=cfg, model=model, params=params, tokenizer=tok,
                           mesh=build_mesh(cfg.mesh), step=0)  # fmt: skip


@pytest.fixture(scope="module")
def scorer(t5):
    """Batches of 4 rows, contexts cut to WINDOW tokens: every batch here is one program."""
    return Scorer(t5, batch_size=4, max_length=WINDOW)


def log_probs(t5, enc: list[int], dec_inputs: list[int]) -> np.ndarray:
    """``(len(dec_inputs), V)`` log-softmax of the model applied to one example: the encoder
    input unpadded (default segments and positions; one compile per encoder length), the
    decoder right-padded to WINDOW (causal: padding after a position changes nothing)."""
    fn = t5.__dict__.setdefault(
        "_ref",
        jax.jit(lambda p, e, d: jax.nn.log_softmax(t5.model.apply({"params": p}, e, d), -1)),
    )
    dec = np.zeros((1, WINDOW), np.int32)
    dec[0, : len(dec_inputs)] = dec_inputs
    out = fn(t5.params, jnp.asarray([enc], jnp.int32), jnp.asarray(dec))
    return np.asarray(out)[0, : len(dec_inputs)]


def reference_ll(t5, enc: list[int], target: list[int]) -> float:
    """log p(target | encoder input): the decoder reads pad (the start token) then the target
    shifted right; the log-softmax summed over the target tokens."""
    log_p = log_probs(t5, enc, [t5.tokenizer.pad_id, *target[:-1]])
    return float(log_p[np.arange(len(target)), target].sum())


def test_loglikelihoods_and_multiple_choice_equal_unpadded_passes(t5, scorer, tmp_path):
    tok, eos = t5.tokenizer, t5.tokenizer.eos_id
    docs = [{"q": PASSAGE, "choices": ["Macbeth", "Banquo", "a walking shadow"], "a": 2},
            {"q": PASSAGE[60:], "choices": ["Viola", "Orsino", "Feste"], "a": 1},
            {"q": PASSAGE[40:], "choices": ["Hamlet", "Lear", "Puck"], "a": 0}]  # fmt: skip
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = {"task": "who", "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": "docs.jsonl"}},
            "output_type": "multiple_choice", "doc_to_text": "{{q}}?",
            "doc_to_choice": "choices", "doc_to_target": "a"}  # fmt: skip
    (tmp_path / "who.yaml").write_text(json.dumps(task))
    # 9 rows in batches of 4 (the last padded with empty rows), targets of several lengths
    got = TaskSuite.load([tmp_path / "who.yaml"], num_fewshot=0).run(scorer, samples=True)
    samples = got["who"]["samples"]
    acc, acc_norm = [], []
    for d, doc in enumerate(docs):
        # the harness's seq2seq split: the context then </s> (its last WINDOW tokens), the
        # choice encoded on its own
        enc = (tok.encode(doc["q"] + "?") + [eos])[-WINDOW:]
        lls = [reference_ll(t5, enc, tok.encode(" " + c)) for c in doc["choices"]]
        mine = [s["result"][0] for s in samples if s["doc"] == d]
        np.testing.assert_allclose(mine, lls, rtol=1e-5, atol=1e-4)
        acc.append(int(np.argmax(lls)) == doc["a"])
        lengths = [len(" " + c) for c in doc["choices"]]
        acc_norm.append(int(np.argmax(np.divide(lls, lengths))) == doc["a"])
    assert len(tok.encode(PASSAGE[60:])) > WINDOW  # every context was cut from the left
    assert got["who"]["acc"] == pytest.approx(np.mean(acc))
    assert got["who"]["acc_norm"] == pytest.approx(np.mean(acc_norm))
    # an empty context is </s> alone; trailing spaces move to the continuation
    assert scorer.encode_pair("", "Alas") == ([eos], tok.encode("Alas"))
    assert scorer.encode_pair("Good night ", "sweet") == (tok.encode("Good night") + [eos],
                                                           tok.encode(" sweet"))  # fmt: skip

    # greedy generation (T5's cached decoder) equals an argmax over uncached passes
    prompts = [d["q"] for d in docs]
    texts = scorer.generate_until([(p, [], 4) for p in prompts])
    for prompt, text in zip(prompts, texts, strict=True):
        enc, out = (tok.encode(prompt) + [eos])[-WINDOW:], []
        for _ in range(4):
            nxt = int(np.argmax(log_probs(t5, enc, [tok.pad_id, *out])[-1]))
            if nxt == eos:
                break
            out.append(nxt)
        assert text == decode_with_sentinels(t5.cfg, tok, out)  # <extra_id_N> past the vocab
    with pytest.raises(TaskError, match="max_gen_toks=0 must be at least 1") as info:
        scorer.generate_until([("Out", [], 0)])
    assert "\n" not in str(info.value)


def test_rolling_loglikelihood_sums_decoder_windows(t5, scorer):
    """The harness's seq2seq rolling windows: each window the decoder's target, </s> then the
    token before it the encoder input (a text of whole windows: all encoders one token, each
    padded to the batch's width)."""
    words, tok = PASSAGE.split(), t5.tokenizer
    prefixes = (" ".join(words[:k]) for k in range(len(words)))
    text = next(t for t in prefixes if len(tok.encode(t)) in (2 * WINDOW, 3 * WINDOW))
    windows = rolling_windows(tok.encode(text), tok.eos_id, WINDOW)
    assert [len(ctx) for ctx, _ in windows] == [1] * len(windows) and len(windows) > 1
    expected = sum(reference_ll(t5, ctx, cont) for ctx, cont in windows)
    assert scorer.loglikelihood_rolling([text])[0] == pytest.approx(expected, abs=1e-3)
