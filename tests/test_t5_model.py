"""The T5 model (flaxlm/models/t5*.py) and its family entry (flaxlm/families/t5.py): cached
decoding equals teacher forcing, scanned stacks equal unrolled ones, packed rows equal the
same examples alone, MoE blocks route and learn, splash cross-attention (queries and keys of
different lengths, segment ids on both sides) equals the dense reference, the unigram baseline
and the config checks."""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO
from flax import linen as nn

from flaxlm.config import ConfigError, load_config
from flaxlm.families import get_family
from flaxlm.families.t5 import unigram_baseline
from flaxlm.models import moe
from flaxlm.models.attention import attention
from flaxlm.models.masks import Mask
from flaxlm.models.splash import splash_attention
from flaxlm.models.t5 import T5
from flaxlm.models.t5_decode import decode_step, encode, init_cache

TINY = REPO / "configs" / "t5_tiny.yaml"


@functools.cache
def tiny(*overrides: str):
    return load_config(TINY, ["model.attention_impl=flaxlm", *overrides], False)


@functools.cache
def params_of(model_cfg):
    init = jax.jit(lambda k: T5(model_cfg).init(k, jnp.zeros((1, 8), jnp.int32)))
    return nn.meta.unbox(init(jax.random.key(0)))["params"]


def test_packed_rows_equal_the_examples_alone():
    """Two examples packed in one row (encoder and decoder segment ids, positions restarting)
    give the logits each gives alone in a padded row."""
    cfg = tiny().model
    model, params = T5(cfg), params_of(cfg)
    rng = np.random.default_rng(1)
    (ea, eb), (da, db) = (
        [rng.integers(7, 300, n).astype(np.int32) for n in sizes] for sizes in ((5, 7), (4, 3))
    )

    def row(parts, length):
        ids, seg, pos = (
            np.zeros(length, np.int32),
            np.zeros(length, np.int32),
            np.zeros(length, np.int32),
        )
        at = 0
        for s, part in parts:
            ids[at : at + len(part)], seg[at : at + len(part)] = part, s
            pos[at : at + len(part)] = np.arange(len(part))
            at += len(part)
        return ids, seg, pos

    rows = [
        (row([(1, ea), (2, eb)], 16), row([(1, da), (2, db)], 9)),
        (row([(1, ea)], 16), row([(1, da)], 9)),
        (row([(1, eb)], 16), row([(1, db)], 9)),
    ]
    enc, enc_seg, enc_pos = (np.stack([r[0][i] for r in rows]) for i in range(3))
    dec, dec_seg, dec_pos = (np.stack([r[1][i] for r in rows]) for i in range(3))
    apply = jax.jit(lambda p: model.apply({"params": p}, enc, dec, enc_seg, dec_seg, enc_pos,
                                          dec_pos))  # fmt: skip
    logits = np.asarray(apply(params))
    np.testing.assert_allclose(logits[0, :4], logits[1, :4], atol=2e-5)
    np.testing.assert_allclose(logits[0, 4:7], logits[2, :3], atol=2e-5)
    assert np.abs(logits[0, 4:7] - logits[1, 4:7]).max() > 1e-3  # segments do differ


@pytest.mark.slow
def test_moe_blocks_route_and_learn():
    """Switch-style experts (top-1, ungated ReLU) in encoder and decoder blocks: the family
    loss with the MoE terms falls on a fixed batch, and every block has a router."""
    from flaxlm.train import moe_terms

    cfg = tiny("model.t5.gated_mlp=false", "model.activation=relu", "model.moe.num_experts=4",
               "model.moe.top_k=1")  # fmt: skip
    family, model = get_family("t5"), T5(cfg.model)
    params = params_of(cfg.model)
    assert "router" in params["encoder"]["blocks_1"]["mlp"]
    assert "router" in params["decoder"]["blocks_0"]["mlp"]
    batch = jax.tree.map(jnp.asarray, family.synthetic_batch(cfg, np.random.default_rng(0)))
    scale = family.loss_scales(cfg, batch)
    loss_fn = moe_terms.with_moe(family.loss, cfg, 1)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        (value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, model, cfg, scale, jax.random.key(0), True
        )
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value, metrics

    state = opt.init(params)
    losses = []
    for _ in range(8):
        params, state, value, metrics = step(params, state)
        losses.append(float(value))
    assert float(metrics["moe_aux_loss"]) > 0
    assert losses[-1] < losses[0] - 0.1, losses
    _, collected = model.apply(
        {"params": params}, batch["encoder_ids"][:2], mutable=[moe.COLLECTION]
    )
    assert moe.collect(collected)["expert_tokens"].sum() > 0


def test_splash_cross_attention_equals_dense():
    """Splash (interpret mode on the CPU) with 128 queries over 256 keys and segment ids on
    both sides, as T5's cross-attention runs it on TPU, against the dense path."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(1, n, 2, 64)), jnp.float32) for n in (128, 256, 256))
    q_seg = jnp.asarray(np.repeat([1, 2, 0], [60, 50, 18])[None], jnp.int32)
    kv_seg = jnp.asarray(np.repeat([1, 2, 0], [100, 120, 36])[None], jnp.int32)
    mask = Mask(q_seg, kv_seg)
    ours = splash_attention(q, k, v, mask)
    ref = attention(q, k, v, mask, "xla")
    real = np.asarray(q_seg[0] > 0)
    np.testing.assert_allclose(np.asarray(ours)[0, real], np.asarray(ref)[0, real], atol=2e-5)


def test_unigram_baseline_is_the_targets_own_entropy():
    targets = np.array([5, 5, 5, 9, 9, 12, 300, 5])
    counts = collections.Counter(targets.tolist())
    entropy = -sum(c / 8 * np.log(c / 8) for c in counts.values())
    out = unigram_baseline(targets, {"val_loss": 1.0})
    assert out["unigram_loss"] == pytest.approx(entropy)
    assert out["gain_over_unigram"] == pytest.approx(entropy - 1.0)
    assert out["unigram_accuracy"] == pytest.approx(4 / 8)
    assert unigram_baseline(np.zeros(0, np.int64), {"val_loss": 1.0}) == {}


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.norm=layernorm", "model.norm='layernorm': t5 needs 'rmsnorm'"),
        ("model.use_bias=true", "model.use_bias=True: t5 needs False"),
        ("model.t5.relative_buckets=7", "model.t5.relative_buckets=7 must be even"),
        ("model.moe.num_experts=4", "model.t5.gated_mlp=true with model.moe.num_experts > 0"),
        ("model.activation=swiglu", "model.activation='swiglu'"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override], False)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_original_layout_ties_and_scales_the_head():
    """tie_embeddings (original T5): no lm_head; logits = (x / sqrt(d)) . embedding."""
    cfg = dataclasses.replace(tiny().model, tie_embeddings=False)
    assert "lm_head" in params_of(cfg)
    tied = tiny("model.tie_embeddings=true").model
    params = params_of(tied)
    assert "lm_head" not in params
    x_BxLxD = jnp.ones((1, 1, tied.d_model))
    logits = T5(tied).apply({"params": params}, x_BxLxD, method=T5.head)
    table = params["token_embed"]["embedding"]
    np.testing.assert_allclose(
        np.asarray(logits)[0, 0],
        np.asarray(table.sum(-1)) / np.sqrt(tied.d_model),
        rtol=1e-5,
        atol=1e-7,
    )


def restack(tree: dict) -> dict:
    """An unrolled stack's ``blocks_0 .. blocks_{n-1}`` as ``layers/block``, each leaf stacked
    on a leading layer axis (the layout of model.scan_layers)."""
    n = sum(k.startswith("blocks_") for k in tree)
    blocks = [tree[f"blocks_{i}"] for i in range(n)]
    rest = {k: v for k, v in tree.items() if not k.startswith("blocks_")}
    return {**rest, "layers": {"block": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}}


def test_cached_decoding_and_scanned_stacks_equal_teacher_forcing():
    """Step t of decode_step (encoder once, cross K/V once, self-attention cache) gives the
    logits the full decoder computes at position t for the same tokens; and with
    model.scan_layers (one nn.scan per stack, remat inside) the same parameters stacked on a
    leading layer axis give the unrolled model's logits, loss, gradients and cached steps."""
    unrolled = tiny().model
    scanned = tiny("model.scan_layers=true", "model.remat=full").model
    params = params_of(unrolled)
    restacked = {**params, "encoder": restack(params["encoder"]),
                 "decoder": restack(params["decoder"])}  # fmt: skip
    want = jax.eval_shape(T5(scanned).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert jax.tree.map(np.shape, nn.meta.unbox(want)["params"]) == jax.tree.map(
        np.shape, restacked
    )
    rng = np.random.default_rng(0)
    enc_BxS = jnp.asarray(rng.integers(7, 300, (2, 20)), jnp.int32)
    enc_seg_BxS = jnp.ones((2, 20), jnp.int32).at[1, 14:].set(0)  # row 1: 6 padding slots
    tokens_BxT = jnp.asarray(rng.integers(7, 300, (2, 9)), jnp.int32)
    dec_in_BxT = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tokens_BxT[:, :-1]], axis=1)

    def run(model_cfg, params):
        model = T5(model_cfg)

        def loss(p):
            full = model.apply({"params": p}, enc_BxS, dec_in_BxT, enc_seg_BxS)
            log_p = jax.nn.log_softmax(full, axis=-1)
            return -jnp.mean(jnp.take_along_axis(log_p, tokens_BxT[..., None], axis=-1)), full

        (value, full), grads = jax.value_and_grad(loss, has_aux=True)(params)
        encoded = encode(model, params, enc_BxS, enc_seg_BxS)
        cache = init_cache(model, params, encoded, enc_seg_BxS, max_len=9)

        def one(cache, token_B):
            logits_BxV, cache = decode_step(model, params, cache, token_B)
            return cache, logits_BxV

        _, stepped_TxBxV = jax.lax.scan(one, cache, dec_in_BxT.T)
        return value, grads, full, stepped_TxBxV.transpose(1, 0, 2)

    loss_u, grads_u, full_u, stepped_u = jax.jit(functools.partial(run, unrolled))(params)
    loss_s, grads_s, full_s, stepped_s = jax.jit(functools.partial(run, scanned))(restacked)
    assert float(jnp.std(full_u)) > 0.1
    np.testing.assert_allclose(np.asarray(stepped_u), np.asarray(full_u), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(full_s), np.asarray(full_u), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(stepped_s), np.asarray(full_u), atol=2e-5, rtol=0)
    np.testing.assert_allclose(float(loss_s), float(loss_u), rtol=1e-6)
    grads_u = {**grads_u, "encoder": restack(grads_u["encoder"]),
               "decoder": restack(grads_u["decoder"])}  # fmt: skip
    assert jax.tree.structure(grads_s) == jax.tree.structure(grads_u)
    for (path, g_s), g_u in zip(
        jax.tree_util.tree_flatten_with_path(grads_s)[0], jax.tree.leaves(grads_u), strict=True
    ):
        np.testing.assert_allclose(g_s, g_u, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_scanned_params_convert_as_the_unrolled_ones(tmp_path):
    """HF export of a scan_layers run writes the unrolled run's tensors; the import gives back
    the stacked layout."""
    from flaxlm.tools.convert import export_hf, import_hf

    unrolled, scanned = tiny().model, tiny("model.scan_layers=true").model
    shapes = jax.eval_shape(T5(unrolled).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    rng = np.random.default_rng(3)  # random weights without compiling init
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32),
                          nn.meta.unbox(shapes)["params"])  # fmt: skip
    restacked = {**params, "encoder": restack(params["encoder"]),
                 "decoder": restack(params["decoder"])}  # fmt: skip
    export_hf(unrolled, params, tmp_path / "unrolled")
    export_hf(scanned, restacked, tmp_path / "scanned")
    files = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("unrolled", "scanned")]
    assert files[0] == files[1]
    cfg, back = import_hf(tmp_path / "scanned")
    assert cfg.scan_layers
    assert jax.tree.structure(back) == jax.tree.structure(restacked)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(restacked), strict=True):
        np.testing.assert_array_equal(a, b)
