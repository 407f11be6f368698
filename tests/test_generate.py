"""Generation: the KV cache against full recomputation, the filters against NumPy, sampling
against the softmax, beam search against greedy and on a toy model where greedy is wrong."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxlm.config import ModelConfig
from flaxlm.models import GPT
from flaxlm.tools import beam, sampling
from flaxlm.tools.generate import (
    GenerateOptions,
    decode_step,
    generate_ids,
    init_cache,
    pad_prompts,
)
from flaxlm.tools.sampling import SamplingOptions

V, EOS, PAD = 64, 3, 0


def tiny(**overrides) -> ModelConfig:
    base = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=48)
    return dataclasses.replace(base, **overrides)


@functools.cache
def noisy_params(cfg: ModelConfig, seed: int = 0):
    """Random params with noise on biases and norms too, so every term of the math matters;
    the larger scale makes logits far from uniform, so argmax has clear winners."""
    params = nn.meta.unbox(GPT(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))
    leaves, tree = jax.tree.flatten(params["params"])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]


# --- the KV cache ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "positions,kv_heads",
    [("learned", 0), ("sinusoidal", 0), ("rope", 0), ("rope", 2), ("learned", 1)],
    ids=["learned", "sinusoidal", "rope", "rope-gqa", "learned-mqa"],
)
def test_kv_cache_logits_equal_full_recomputation_at_every_step(positions, kv_heads):
    cfg = tiny(positions=positions, n_kv_heads=kv_heads)
    model, params = GPT(cfg), noisy_params(cfg)
    n_new = 10
    # Random continuations (not argmax), so the test does not depend on the model's taste.
    rng = np.random.default_rng(0)
    sequences = [p + rng.integers(0, V, n_new).tolist() for p in PROMPTS]
    # The reference: each whole sequence in one causal forward pass (right padding cannot
    # change earlier positions), whose position t holds the logits after token t.
    width = max(map(len, sequences))
    right_padded = np.array([s + [PAD] * (width - len(s)) for s in sequences], np.int32)
    expected_BxTxV = jax.jit(lambda t: model.apply({"params": params}, t))(right_padded)

    step = jax.jit(functools.partial(decode_step, model, params))
    padded = pad_prompts(PROMPTS, PAD, bucket=8)
    cache = init_cache(model, len(PROMPTS), padded.tokens_BxP.shape[1] + n_new)
    if kv_heads:  # the cache holds only the key/value heads: GQA's memory saving
        shapes = {x.shape[-2] for x in jax.tree.leaves(cache) if x.ndim == 4}
        assert shapes == {kv_heads}, shapes
    logits_BxPxV, cache = step(
        cache, padded.tokens_BxP, padded.positions_BxP, padded.segment_ids_BxP
    )
    logits_BxV = logits_BxPxV[:, -1]
    for i in range(n_new):
        for row, prompt in enumerate(PROMPTS):
            expected = expected_BxTxV[row, len(prompt) - 1 + i]
            np.testing.assert_allclose(logits_BxV[row], expected, atol=2e-5, rtol=1e-5)
        next_Bx1 = np.array([[s[len(p) + i]] for s, p in zip(sequences, PROMPTS, strict=True)])
        positions_Bx1 = np.array([[len(p) + i] for p in PROMPTS], np.int32)
        logits_Bx1xV, cache = step(cache, jnp.asarray(next_Bx1, jnp.int32), positions_Bx1)
        logits_BxV = logits_Bx1xV[:, 0]
        assert int(cache["index"]) == padded.tokens_BxP.shape[1] + i + 1


def test_the_training_forward_pass_is_unchanged_by_the_cache_option():
    cfg = tiny()
    model, params = GPT(cfg), noisy_params(cfg)
    tokens = jnp.asarray([PROMPTS[0] * 2])
    variables = model.init(jax.random.key(0), tokens)
    assert set(variables) == {"params"}  # no cache unless decoding
    plain = model.apply({"params": params}, tokens)
    cache = init_cache(model, 1, tokens.shape[1])
    positions = jnp.arange(tokens.shape[1])[None]
    cached, _ = jax.jit(functools.partial(decode_step, model))(params, cache, tokens, positions)
    np.testing.assert_allclose(plain, cached, atol=1e-5)


def reference_greedy(model, params, prompt, n, context):
    """Greedy decoding the obvious way: the last ``context`` tokens through ``model.apply``
    (right-padded to ``context``, so one compiled function serves every step)."""
    apply = jax.jit(lambda t: model.apply({"params": params}, t))
    seq = list(prompt)
    for _ in range(n):
        window = seq[-context:]
        logits = apply(jnp.asarray([window + [PAD] * (context - len(window))]))
        seq.append(int(jnp.argmax(logits[0, len(window) - 1])))
    return seq[len(prompt) :]


def test_batched_greedy_with_different_lengths_equals_the_reference_past_the_context():
    cfg = tiny()
    model, params = GPT(cfg), noisy_params(cfg)
    context, n = 16, 14  # the 7-token prompt fills 16 and slides on
    opts = GenerateOptions(max_new_tokens=n, stop_at_eos=False)
    cached = generate_ids(model, params, PROMPTS, opts, EOS, PAD, context=context)
    recomputed = generate_ids(model, params, PROMPTS, opts, EOS, PAD, context, use_cache=False)
    assert cached.ids == recomputed.ids
    for prompt, got in zip(PROMPTS, cached.ids, strict=True):
        assert got == reference_greedy(model, params, prompt, n, context)
    assert len({t for row in cached.ids for t in row}) > 3


# --- filters and sampling -------------------------------------------------------------------


def numpy_top_k(logits, k):
    out = logits.copy()
    for row in out:
        kth = np.sort(row)[::-1][k - 1]
        row[row < kth] = -np.inf
    return out


def numpy_top_p(logits, p):
    out = logits.copy()
    for row in out:
        order = np.argsort(-row, kind="stable")
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        mass = 0.0
        for rank, i in enumerate(order):
            if rank > 0 and mass >= p:
                row[i] = -np.inf
            mass += probs[rank]
    return out


@pytest.mark.parametrize("k", [1, 2, 5, 17])
def test_top_k_equals_numpy(k):
    logits = np.random.default_rng(k).normal(size=(4, 32)).astype(np.float32)
    logits[0, :3] = logits[0].max() + 1  # ties at the top
    np.testing.assert_array_equal(
        sampling.top_k_filter(jnp.asarray(logits), k), numpy_top_k(logits, k)
    )


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95])
def test_top_p_equals_numpy(p):
    logits = np.random.default_rng(7).normal(size=(4, 32)).astype(np.float32) * 2
    got = np.asarray(sampling.top_p_filter(jnp.asarray(logits), p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(numpy_top_p(logits, p)))
    assert np.isfinite(got).sum(-1).min() >= 1  # the top token always survives


def test_temperature_top_k_and_top_p_compose_in_that_order():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32)), jnp.float32)
    opts = SamplingOptions(temperature=0.5, top_k=10, top_p=0.8)
    expected = numpy_top_p(numpy_top_k(np.asarray(logits) / 0.5, 10), 0.8)
    np.testing.assert_allclose(sampling.filter_logits(logits, opts), expected, rtol=1e-6)


def _draws(logits_V, opts, n=20_000, seed=0):
    logits_NxV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
    return np.asarray(sampling.choose_tokens(logits_NxV, opts, jax.random.key(seed), 0))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_matches_the_softmax(temperature):
    """Chi-square goodness of fit; with fixed seeds the test is deterministic."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = _draws(logits, SamplingOptions(temperature=temperature))
    expected = np.exp(logits / temperature)
    expected = expected / expected.sum() * len(draws)
    observed = np.bincount(draws, minlength=len(logits))
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 20.5  # the 0.999 quantile of chi-square with 5 degrees of freedom


def test_top_k_sampling_only_draws_the_top_k_in_proportion():
    logits = np.array([3.0, 2.5, 2.0, 1.0, 0.0])
    draws = _draws(logits, SamplingOptions(temperature=1.0, top_k=2))
    assert set(np.unique(draws)) == {0, 1}
    assert np.mean(draws == 0) == pytest.approx(1 / (1 + np.exp(-0.5)), abs=0.015)


def test_greedy_equals_top_k_1_and_beam_search_with_one_beam():
    cfg = tiny()
    model, params = GPT(cfg), noisy_params(cfg)
    greedy = GenerateOptions(max_new_tokens=12, stop_at_eos=False)
    top1 = dataclasses.replace(greedy, temperature=1.3, top_k=1, seed=5)
    one_beam = dataclasses.replace(greedy, num_beams=1)
    ids = generate_ids(model, params, PROMPTS, greedy, EOS).ids
    assert generate_ids(model, params, PROMPTS, top1, EOS).ids == ids
    assert generate_ids(model, params, PROMPTS, one_beam, EOS).ids == ids
    # Beam search proper with one beam (the generate path sends num_beams=1 to greedy).
    assert _beam_ids(model, params, PROMPTS, 1, 12, alpha=0.0) == ids


def _beam_ids(model, params, prompts, beams, n, alpha):
    from flaxlm.tools.generate import _beam_generate

    padded = pad_prompts(prompts, PAD)
    opts = GenerateOptions(max_new_tokens=n, num_beams=beams, length_penalty=alpha)
    result = _beam_generate(
        model,
        params,
        *map(jnp.asarray, (padded.tokens_BxP, padded.positions_BxP, padded.segment_ids_BxP)),
        jnp.asarray(padded.lengths_B),
        opts=opts,
        eos_id=None,
        pad_id=PAD,
    )
    return np.asarray(result.tokens_BxWxN[:, 0]).tolist()


def test_sampling_is_seeded_and_rows_do_not_depend_on_their_batch_mates():
    cfg = tiny()
    model, params = GPT(cfg), noisy_params(cfg)
    opts = GenerateOptions(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    first = generate_ids(model, params, PROMPTS, opts, EOS).ids
    assert generate_ids(model, params, PROMPTS, opts, EOS).ids == first
    assert generate_ids(model, params, PROMPTS, dataclasses.replace(opts, seed=4), EOS).ids != first
    assert generate_ids(model, params, PROMPTS[:1], opts, EOS).ids == first[:1]


def test_rows_stop_at_eos_and_the_eos_is_not_returned():
    # A toy step function: each row's next-token logits are a fixed table row of its token.
    table = np.full((8, 8), -10.0, np.float32)
    table[1, 2] = table[2, EOS] = table[5, 6] = table[6, 7] = table[7, 5] = 0.0
    step = _table_step(table)
    first = jnp.asarray(table[[1, 5]])
    tokens, done = sampling.sample_loop(
        step, first, (), jnp.zeros(2, jnp.int32), SamplingOptions(), 6, EOS, PAD, jax.random.key(0)
    )
    assert np.asarray(tokens).tolist() == [[2, EOS, PAD, PAD, PAD, PAD], [6, 7, 5, 6, 7, 5]]
    assert np.asarray(done).tolist() == [True, False]


def test_generate_options_name_the_bad_value():
    with pytest.raises(ValueError, match="top_p=1.5"):
        GenerateOptions(top_p=1.5)
    with pytest.raises(ValueError, match="top_k=-1"):
        GenerateOptions(top_k=-1)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        GenerateOptions(max_new_tokens=0)
    cfg = tiny()
    with pytest.raises(ValueError, match="max_new_tokens=48 must be below"):
        generate_ids(GPT(cfg), noisy_params(cfg), PROMPTS, GenerateOptions(48, num_beams=2), EOS)


# --- beam search on a toy model -------------------------------------------------------------


def _table_step(table_VxV):
    """A first-order Markov 'model': the state is empty, the logits depend on the last token."""
    table = jnp.asarray(table_VxV)

    def step(state, token_Bx1, _positions_Bx1):
        return table[token_Bx1[:, 0]], state

    return step


def _log_probs(table, start, seq):
    logp = jax.nn.log_softmax(jnp.asarray(table), axis=-1)
    total, prev = 0.0, start
    for t in seq:
        total += float(logp[prev, t])
        prev = t
    return total


def _garden_path_table():
    """From token 1: 'A'=10 (p 0.55) leads to a flat distribution over 8 tokens; 'B'=20
    (p 0.45) leads to 21 almost surely. Greedy takes A; the best 2-token sequence is B 21."""
    v = 32
    table = np.full((v, v), -30.0, np.float32)
    table[1, 10], table[1, 20] = np.log(0.55), np.log(0.45)
    table[10, 11:19] = 0.0
    table[20, 21] = 0.0
    for t in list(range(11, 19)) + [21]:
        table[t, t] = 0.0  # then repeat forever
    return table


def test_beam_search_beats_greedy_on_a_garden_path():
    table = _garden_path_table()
    step = _table_step(table)
    first = jnp.asarray(table[[1]])
    greedy, _ = sampling.sample_loop(
        step, first, (), jnp.zeros(1, jnp.int32), SamplingOptions(), 3, None, PAD, jax.random.key(0)
    )
    search = jax.jit(
        lambda f: beam.beam_search(step, f, (), jnp.zeros(1, jnp.int32), 3, 3, None, PAD, 0.0)
    )
    result = search(first)
    best = np.asarray(result.tokens_BxWxN[0, 0]).tolist()
    greedy = np.asarray(greedy[0]).tolist()
    assert greedy[0] == 10 and best[:2] == [20, 21]
    assert _log_probs(table, 1, best) > _log_probs(table, 1, greedy) + 1.0
    np.testing.assert_allclose(result.scores_BxW[0, 0], _log_probs(table, 1, best), atol=1e-5)
    # Beams come back best first.
    assert np.all(np.diff(np.asarray(result.scores_BxW[0])) <= 0)


def test_beam_search_ends_hypotheses_at_eos_with_the_gnmt_length_penalty():
    """From 1: EOS at once (p 0.4) or 9 then a sure path (p 0.6 then ~1 per step). With
    alpha = 0 the short finished hypothesis wins only if it is more likely; a large alpha
    favours the long one."""
    v = 16
    table = np.full((v, v), -30.0, np.float32)
    table[1, EOS], table[1, 9] = np.log(0.5), np.log(0.5)
    table[9, 10] = np.log(0.7)
    table[9, 11] = np.log(0.3)
    table[10, 10] = table[11, 11] = 0.0
    step = _table_step(table)
    first = jnp.asarray(table[[1, 1]])  # two identical rows: batching must not mix them

    def search(alpha):
        fn = lambda f: beam.beam_search(  # noqa: E731
            step, f, (), jnp.zeros(2, jnp.int32), 2, 4, EOS, PAD, alpha
        )
        return jax.jit(fn)(first)

    short = search(0.0)
    assert np.asarray(short.tokens_BxWxN[:, 0]).tolist() == [[EOS, PAD, PAD, PAD]] * 2
    assert np.asarray(short.lengths_BxW[:, 0]).tolist() == [1, 1]
    np.testing.assert_allclose(short.scores_BxW[:, 0], np.log(0.5), atol=1e-5)

    long = search(2.0)
    assert np.asarray(long.tokens_BxWxN[0, 0]).tolist() == [9, 10, 10, 10]
    lp = beam.length_penalty(jnp.asarray(4), 2.0)
    np.testing.assert_allclose(long.scores_BxW[0, 0], np.log(0.5 * 0.7) / lp, atol=1e-5)
