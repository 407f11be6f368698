"""flaxlm T5 <-> transformers ``T5ForConditionalGeneration`` (flaxlm/hf/t5.py): both layouts
(v1.1: gated GELU, untied head; original: ReLU, tied head scaled by d_model^-1/2) agree with
transformers on random inputs to 1e-4 in fp32, greedy decoding with our cache gives the tokens
of transformers' ``generate()``, HF's own random weights import, and the exported tokenizer
(with T5's sentinels) loads with ``AutoTokenizer``."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import flaxlm.families  # noqa: F401  (registers model.t5)
from flaxlm.config import ModelConfig
from flaxlm.hf.t5 import t5_config
from flaxlm.models.t5 import T5, T5Options
from flaxlm.models.t5_attention import relative_bucket
from flaxlm.models.t5_decode import greedy
from flaxlm.tools.convert import export_hf, import_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 120


def t5_cfg(gated: bool, **changes) -> ModelConfig:
    """A tiny T5: v1.1 (gated GELU, untied) or the original layout (ReLU, tied)."""
    options = T5Options(decoder_layers=changes.pop("decoder_layers", 2), relative_buckets=8,
                        relative_max_distance=20, gated_mlp=gated)  # fmt: skip
    cfg = ModelConfig(
        family="t5", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=48,
        activation="gelu" if gated else "relu", norm="rmsnorm", norm_eps=1e-6,
        tie_embeddings=not gated, use_bias=False, attention_impl="flaxlm",
        extra_sections=(("t5", options),),
    )  # fmt: skip
    return dataclasses.replace(cfg, **changes)


@functools.cache
def noisy_params(cfg: ModelConfig, seed: int = 0):
    """Random params plus noise on every leaf (norm scales too), built under jit (eager
    init of a T5 dispatches thousands of small ops)."""

    def make(key):
        params = nn.meta.unbox(T5(cfg).init(key, jnp.zeros((1, 8), jnp.int32)))["params"]
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
        return jax.tree.unflatten(tree, noisy)

    return jax.jit(make)(jax.random.key(seed))


@functools.cache
def _apply(cfg: ModelConfig):
    return jax.jit(lambda p, e, d, m: T5(cfg).apply({"params": p}, e, d, m))


def ours_logits(cfg: ModelConfig, params, enc, dec, mask) -> np.ndarray:
    return np.asarray(_apply(cfg)(params, enc, dec, mask))


def hf_model(hf_dir):
    return transformers.T5ForConditionalGeneration.from_pretrained(str(hf_dir)).eval()


def hf_logits(model, enc: np.ndarray, dec: np.ndarray, enc_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(enc).long(),
            attention_mask=torch.from_numpy(enc_mask).long(),
            decoder_input_ids=torch.from_numpy(dec).long(),
        )
    return out.logits.numpy()


def inputs(seed: int = 0):
    """Two rows of random ids, the second with 6 encoder padding positions (mask 0)."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, VOCAB, (2, 30)).astype(np.int32)
    dec = rng.integers(2, VOCAB, (2, 25)).astype(np.int32)
    mask = np.ones_like(enc)
    mask[1, -6:] = 0
    return enc, dec, mask


@pytest.mark.slow
@pytest.mark.parametrize("gated", [True, False], ids=["v1.1", "original"])
def test_exported_logits_and_greedy_tokens_equal_transformers(gated, tmp_path):
    cfg = t5_cfg(gated)
    params = noisy_params(cfg)
    export_hf(cfg, params, tmp_path)
    theirs = hf_model(tmp_path)
    enc, dec, mask = inputs()
    ours = ours_logits(cfg, params, enc, dec, mask)
    ref = hf_logits(theirs, enc, dec, mask)
    assert np.abs(ref).std() > 0.1  # not a degenerate comparison
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    # Greedy decoding with the cache (flaxlm/models/t5_decode.py) against generate().
    steps = 12
    ours_tokens = greedy(T5(cfg), params, jnp.asarray(enc), jnp.asarray(mask), steps)
    with torch.no_grad():
        ref_tokens = theirs.generate(
            input_ids=torch.from_numpy(enc).long(),
            attention_mask=torch.from_numpy(mask).long(),
            max_new_tokens=steps, do_sample=False, num_beams=1, eos_token_id=None,
        )  # fmt: skip
    if gated:  # (the tied ReLU model at this size repeats one token)
        assert len(set(ref_tokens[:, 1:].numpy().ravel().tolist())) > 2
    np.testing.assert_array_equal(np.asarray(ours_tokens), ref_tokens[:, 1:].numpy())


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])
def test_transformers_weights_import(proj, tmp_path):
    """HF's own initialisation, saved by transformers, read by import_hf (from-hf)."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj=proj, tie_word_embeddings=proj == "relu", dropout_rate=0.0,
    )  # fmt: skip
    theirs = transformers.T5ForConditionalGeneration(config).eval()
    if proj != "relu":  # v1.1: a head of its own
        theirs.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
    theirs.save_pretrained(str(tmp_path))
    cfg, params = import_hf(tmp_path)
    assert cfg.family == "t5" and cfg.t5.decoder_layers == 3
    assert cfg.t5.gated_mlp == (proj != "relu") and cfg.tie_embeddings == (proj == "relu")
    enc, dec, mask = inputs(1)
    ours = ours_logits(cfg, params, enc, dec, mask)
    np.testing.assert_allclose(ours, hf_logits(theirs, enc, dec, mask), atol=1e-4)


def test_round_trip_is_exact_and_refusals_name_the_option(tmp_path):
    cfg = t5_cfg(True)
    params = noisy_params(cfg)
    export_hf(cfg, params, tmp_path)
    back_cfg, back = import_hf(tmp_path)
    assert back_cfg == cfg  # the flaxlm config kept in config.json
    for a, b in zip(_leaves(params), _leaves(back), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # query: x sqrt(8) / sqrt(8)
    from flaxlm.hf.base import ConversionError

    with pytest.raises(ConversionError, match="model.activation='gelu_exact'"):
        t5_config(t5_cfg(True, activation="gelu_exact"))
    with pytest.raises(ConversionError, match="model.n_kv_heads=2"):
        t5_config(t5_cfg(True, n_kv_heads=2))


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_relative_buckets_equal_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    offsets = np.arange(-300, 300)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            ref = T5Attention._relative_position_bucket(
                torch.from_numpy(offsets), bidirectional, buckets, distance
            ).numpy()
            ours = relative_bucket(jnp.asarray(offsets), bidirectional, buckets, distance)
            np.testing.assert_array_equal(np.asarray(ours), ref)


def test_tokenizer_with_sentinels_loads_with_auto_tokenizer(small_corpus, tmp_path):
    from flaxlm.tokenizers.sentencepiece import Tokenizer, train_tokenizer

    plays = sorted(small_corpus.iterdir())[:2]
    tok = Tokenizer.load(train_tokenizer(plays, tmp_path / "tok", vocab_size=512))
    cfg = t5_cfg(True, vocab_size=tok.vocab_size + 16)
    shapes = jax.eval_shape(lambda: noisy_params.__wrapped__(cfg))  # no compile: zeros do
    export_hf(cfg, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes), tmp_path / "hf",
              tok, seq_len=64)  # fmt: skip
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "To be, or not to be: that is the question."
    assert theirs(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert theirs.convert_tokens_to_ids("<extra_id_0>") == cfg.vocab_size - 1
    assert theirs.convert_tokens_to_ids("<extra_id_15>") == tok.vocab_size
    ids = [*tok.encode("To be"), cfg.vocab_size - 1, *tok.encode(" not")]
    assert theirs.decode(ids) == "To be<extra_id_0> not"
