"""The BERT encoder: param tree and logical names, bidirectional attention, prefix-LM masks,
MLM logits only at gathered positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxlm.config import ModelConfig
from flaxlm.families import build_model
from flaxlm.losses.objectives import causal_lm_loss, mlm_loss
from flaxlm.models import BERT
from flaxlm.models.masks import Mask
from flaxlm.parallel.sharding import LOGICAL_RULES


def _cfg(**kw) -> ModelConfig:
    base = dict(family="bert", vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                max_seq_len=16, activation="gelu_exact", norm_placement="post")  # fmt: skip
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model_and_params():
    model = build_model(_cfg())
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    return model, variables


def test_param_tree_and_logical_names(model_and_params):
    model, variables = model_and_params
    assert isinstance(model, BERT)
    params = nn.meta.unbox(variables["params"])
    assert set(params) == {
        "token_embed", "position_embed", "type_embed", "ln_embed", "blocks_0", "blocks_1",
        "pooler", "mlm_transform", "mlm_ln", "mlm_bias", "nsp_head",
    }  # fmt: skip
    assert set(params["blocks_0"]) == {"attn", "ln_attn", "mlp", "ln_mlp"}
    assert params["mlm_bias"].shape == (97,) and params["type_embed"]["embedding"].shape[0] == 2
    specs = jax.tree.leaves(
        nn.get_partition_spec(variables)["params"],
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    known = dict(LOGICAL_RULES)
    assert len(specs) == len(jax.tree.leaves(params))
    for spec in specs:  # every parameter is named, with names the rules table knows
        assert spec and all(name in known for name in spec), spec
    pre = build_model(_cfg(norm_placement="pre"))
    pre_params = pre.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    assert "ln_final" in pre_params and "ln_final" not in params


def test_encoder_is_bidirectional_and_gpt_is_not(model_and_params):
    model, variables = model_and_params
    tokens = jnp.arange(1, 17, dtype=jnp.int32)[None]
    changed = tokens.at[0, 12].set(50)  # a later token
    x = model.apply(variables, tokens, method=BERT.encode)
    y = model.apply(variables, changed, method=BERT.encode)
    assert not np.allclose(x[0, 3], y[0, 3])  # position 3 sees position 12
    gpt = build_model(_cfg(family="gpt", norm_placement="pre", activation="gelu"))
    gv = gpt.init(jax.random.key(0), tokens)
    np.testing.assert_array_equal(gpt.apply(gv, tokens)[0, 3], gpt.apply(gv, changed)[0, 3])


def test_prefix_lm_mask_and_model():
    seg = jnp.array([[1, 1, 1, 1, 1, 2], [1, 1, 1, 1, 0, 0]], jnp.int32)
    mask = np.asarray(Mask.prefix_lm(seg, jnp.array([3, 0])).dense())[:, 0]
    i, j = np.arange(6)[:, None], np.arange(6)[None, :]
    same = np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :]
    np.testing.assert_array_equal(mask[0], same[0] & ((j <= i) | (j < 3)))
    np.testing.assert_array_equal(mask[1], same[1] & (j <= i))  # prefix 0 = causal

    model = build_model(_cfg())
    tokens = jnp.arange(1, 17, dtype=jnp.int32)[None]
    variables = model.init(jax.random.key(0), tokens)
    prefix = jnp.array([6])

    def enc(t):
        return model.apply(variables, t, prefix_len_B=prefix, method=BERT.encode)[0]

    base = enc(tokens)
    inside = enc(tokens.at[0, 4].set(60))  # a later token inside the prefix
    assert not np.allclose(base[1], inside[1])  # seen by earlier prefix positions
    after = enc(tokens.at[0, 10].set(60))  # a token after the prefix
    np.testing.assert_allclose(base[:10], after[:10], atol=1e-6)  # invisible to the past
    assert not np.allclose(base[10], after[10])


def test_gathered_mlm_loss_equals_full_logits_loss(model_and_params):
    model, variables = model_and_params
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(7, 97, (3, 16)), jnp.int32)
    positions = jnp.asarray([[1, 4, 9, 0], [2, 3, 15, 0], [0, 7, 8, 11]], jnp.int32)
    weights = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]], jnp.float32)
    ids = jnp.asarray(rng.integers(7, 97, (3, 4)), jnp.int32)
    out = model.apply(variables, tokens, masked_positions_BxP=positions)
    assert out["mlm_logits"].shape == (3, 4, 97) and out["nsp_logits"].shape == (3, 2)
    gathered, gm = mlm_loss(out["mlm_logits"], ids, weights)

    full = model.apply(variables, tokens)["mlm_logits"]  # all 16 positions
    targets = np.zeros((3, 16), np.int32)
    mask = np.zeros((3, 16), np.float32)
    for b in range(3):
        for p in range(4):
            if weights[b, p]:
                targets[b, positions[b, p]] = ids[b, p]
                mask[b, positions[b, p]] = 1
    expected, fm = causal_lm_loss(full, jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(gathered, expected, rtol=1e-5)
    assert float(gm["n_tokens"]) == float(fm["n_tokens"]) == 10
    np.testing.assert_allclose(gm["correct"], fm["correct"])


def test_padding_does_not_change_real_tokens(model_and_params):
    model, variables = model_and_params
    tokens = jnp.asarray([[4, 20, 30, 40, 5, 0, 0, 0]], jnp.int32)
    seg = jnp.asarray([[1, 1, 1, 1, 1, 0, 0, 0]], jnp.int32)
    a = model.apply(variables, tokens, segment_ids_BxL=seg, method=BERT.encode)
    b = model.apply(variables, tokens.at[0, 6].set(77), segment_ids_BxL=seg, method=BERT.encode)
    np.testing.assert_allclose(a[0, :5], b[0, :5], atol=1e-6)
