"""Encoder–decoder generation (flaxlm/tools/seq2seq_generate.py) against the uncached model:
greedy equals argmax of full teacher-forced passes, beam scores equal the model's
length-penalised log-probabilities, the encoder and the cross-attention K/V run once."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flaxlm.families  # noqa: F401  registers the t5 family and its config sections
from flaxlm.config import ModelConfig
from flaxlm.families import build_model, registered_families
from flaxlm.tools import seq2seq_generate
from flaxlm.tools.generate import GenerateOptions
from flaxlm.tools.seq2seq_generate import generate_seq2seq_ids

pytestmark = pytest.mark.skipif(
    "t5" not in registered_families(), reason="the t5 family entry is not registered yet"
)
EOS, PAD, CONTEXT, N_MAX = 3, 0, 48, 8
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20 + i % 50 for i in range(60)]]


@pytest.fixture(scope="module")
def t5():
    cfg = ModelConfig(
        family="t5", vocab_size=96, d_model=32, n_layers=2, n_heads=4, d_ff=64,
        max_seq_len=64, norm="rmsnorm", use_bias=False, activation="gelu",
        tie_embeddings=False, dropout=0.0,
    )  # fmt: skip
    model = build_model(cfg)
    # Random weights without compiling init: the shapes, then norm scales 1 + noise and every
    # other leaf noise (a model whose greedy answers differ from prompt to prompt).
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    leaves, tree = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(shapes)["params"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = [
        float("scale" in jax.tree_util.keystr(path)) + 0.5 * jax.random.normal(k, x.shape)
        for (path, x), k in zip(leaves, keys, strict=True)
    ]
    return model, jax.tree.unflatten(tree, params)


@pytest.fixture(scope="module")
def reference(t5):
    """Uncached log-softmax of every decoder position, teacher-forced: ``logp(prompt,
    tokens)`` -> ``(len(tokens), V)``. One program: the encoder input padded to CONTEXT
    (segment 0 after the prompt's </s>), the decoder to N_MAX (causal: padding after a
    position does not change it)."""
    model, params = t5

    @jax.jit
    def logp_fn(enc_1xS, seg_1xS, dec_1xN):
        logits = model.apply({"params": params}, enc_1xS, dec_1xN, seg_1xS)
        return jax.nn.log_softmax(logits[0], axis=-1)

    def logp(prompt, tokens):
        enc = list(prompt)[: CONTEXT - 1] + [EOS]
        enc_1xS = np.zeros((1, CONTEXT), np.int32)
        enc_1xS[0, : len(enc)] = enc
        dec_1xN = np.zeros((1, N_MAX), np.int32)
        dec_1xN[0, 1 : len(tokens)] = tokens[:-1]
        return np.asarray(logp_fn(enc_1xS, (enc_1xS > 0).astype(np.int32), dec_1xN))[: len(tokens)]

    return logp


def _count_traces(monkeypatch) -> dict[str, int]:
    """Counts calls of the decode API while a program is traced: a call inside the decoding
    loop would be traced a second time (once for the start token, once for the loop body)."""
    calls = {"encode": 0, "init_cache": 0, "decode_step": 0}
    for name in calls:
        real = getattr(seq2seq_generate.t5_decode, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(seq2seq_generate.t5_decode, name, counted)
    return calls


def _greedy(logp, prompt, n):
    tokens = []
    for _ in range(n):
        tokens.append(int(np.argmax(logp(prompt, tokens + [0])[-1])))
    return tokens


def test_greedy_equals_uncached_argmax(t5, reference, monkeypatch):
    model, params = t5
    calls = _count_traces(monkeypatch)
    opts = GenerateOptions(max_new_tokens=7, stop_at_eos=False)
    ids, scores = generate_seq2seq_ids(model, params, PROMPTS, opts, EOS, PAD, CONTEXT)
    # One encoder pass and one cross-K/V computation, outside the loop.
    assert calls == {"encode": 1, "init_cache": 1, "decode_step": 2}
    assert scores is None
    # Prompts of 7, 2 and 60 tokens in one padded batch: each as if alone (the third cut).
    assert ids == [_greedy(reference, p, 7) for p in PROMPTS]
    assert len({tuple(r) for r in ids}) > 1  # not a degenerate model
    # Sampling: a pure function of the seed (traced, one program), not the greedy answer.
    hot = GenerateOptions(max_new_tokens=7, temperature=1.5, seed=4, stop_at_eos=False)
    a = generate_seq2seq_ids(model, params, PROMPTS, hot, EOS, PAD, CONTEXT)[0]
    assert a == generate_seq2seq_ids(model, params, PROMPTS, hot, EOS, PAD, CONTEXT)[0]
    other = dataclasses.replace(hot, seed=5)
    assert a != ids and a != generate_seq2seq_ids(model, params, PROMPTS, other, EOS, PAD,
                                                  CONTEXT)[0]  # fmt: skip


def _penalised(logp, prompt, row, n, alpha=0.6):
    tokens = row + [EOS] if len(row) < n else row  # the </s> counts when it ended
    lp = logp(prompt, tokens)
    return float(sum(lp[i, t] for i, t in enumerate(tokens))) / ((5 + len(tokens)) / 6) ** alpha


def test_beam_scores_are_the_models_penalised_log_probabilities(t5, reference, monkeypatch):
    model, params = t5
    calls = _count_traces(monkeypatch)
    opts = GenerateOptions(max_new_tokens=6, num_beams=3, length_penalty=0.6)
    ids, scores = generate_seq2seq_ids(model, params, PROMPTS[:2], opts, EOS, PAD, CONTEXT)
    assert calls == {"encode": 1, "init_cache": 1, "decode_step": 2}  # beams copy the cache
    greedy = [_greedy(reference, p, 6) for p in PROMPTS[:2]]
    for prompt, row, score, g in zip(PROMPTS[:2], ids, scores, greedy, strict=True):
        assert score == pytest.approx(_penalised(reference, prompt, row, 6), abs=1e-4)
        # The greedy hypothesis is one the search weighed: the beam's is no worse.
        g = g[: g.index(EOS)] if EOS in g else g
        assert score >= _penalised(reference, prompt, g, 6) - 1e-4


def test_prompts_end_in_eos_and_are_right_padded():
    ids, segments = seq2seq_generate.encoder_inputs([[4, 5], [6] * 9], EOS, PAD, 8, bucket=4)
    assert ids.tolist() == [[4, 5, EOS] + [PAD] * 5, [6] * 7 + [EOS]]  # the second cut
    assert segments.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]
