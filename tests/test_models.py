"""Tests for flaxlm.models: masks, positions, numerics against NumPy, logical names, dtypes."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxlm.config import ModelConfig
from flaxlm.families import build_model
from flaxlm.models import GPT, count_params, layers, non_embedding_params
from flaxlm.models.masks import Mask
from flaxlm.parallel.sharding import LOGICAL_RULES

V, D, N_LAYERS, H, F, MAX_LEN, L = 64, 32, 2, 4, 64, 64, 16
POSITIONS = ("learned", "sinusoidal", "rope")


def tiny(**overrides) -> ModelConfig:
    base = ModelConfig(
        vocab_size=V, d_model=D, n_layers=N_LAYERS, n_heads=H, d_ff=F, max_seq_len=MAX_LEN
    )
    return dataclasses.replace(base, **overrides)


_VARIABLES: dict[tuple[str, int, bool], dict] = {}


def init(cfg: ModelConfig, seed: int = 0, noisy: bool = False) -> dict:
    """Unboxed variables, cached per config (arrays are immutable, so tests may share them).

    ``noisy`` adds random values so zero-initialised biases and unit LayerNorm scales are
    exercised too.
    """
    cache_key = (repr(cfg), seed, noisy)
    if cache_key not in _VARIABLES:
        tokens = jnp.zeros((1, L), jnp.int32)
        variables = nn.meta.unbox(GPT(cfg).init(jax.random.key(seed), tokens))
        if noisy:
            leaves, treedef = jax.tree.flatten(variables)
            keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
            noise = [
                0.1 * jax.random.normal(k, x.shape, x.dtype)
                for x, k in zip(leaves, keys, strict=True)
            ]
            variables = jax.tree.unflatten(
                treedef, [x + n for x, n in zip(leaves, noise, strict=True)]
            )
        _VARIABLES[cache_key] = variables
    return _VARIABLES[cache_key]


def abstract_params(cfg: ModelConfig) -> dict:
    """Parameter shapes without computing any values."""
    tokens = jnp.zeros((1, L), jnp.int32)
    return nn.meta.unbox(jax.eval_shape(GPT(cfg).init, jax.random.key(0), tokens))["params"]


def forward(cfg: ModelConfig):
    """Jitted ``GPT(cfg).apply`` (one compile beats eager op-by-op dispatch)."""
    return jax.jit(GPT(cfg).apply, static_argnames="deterministic")


def random_tokens(seed: int, shape=(2, L)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, V, dtype=jnp.int32)


# --- masks and positions --------------------------------------------------------------------


@pytest.mark.parametrize("positions", POSITIONS)
def test_causality_future_tokens_do_not_change_past_logits(positions):
    cfg = tiny(positions=positions)
    model, variables = forward(cfg), init(cfg, noisy=True)
    tokens = random_tokens(0)
    t = 7
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 5) % V)
    before, after = model(variables, tokens), model(variables, changed)
    np.testing.assert_array_equal(before[:, : t + 1], after[:, : t + 1])
    assert not np.allclose(before[:, t + 1 :], after[:, t + 1 :])


@pytest.mark.parametrize("positions", POSITIONS)
def test_packed_documents_are_isolated(positions):
    cfg = tiny(positions=positions)
    model, variables = forward(cfg), init(cfg, noisy=True)
    n1, n2 = 6, L - 6
    tokens = random_tokens(1, (1, L))
    segments = jnp.array([[1] * n1 + [2] * n2], jnp.int32)
    pos = jnp.array([list(range(n1)) + list(range(n2))], jnp.int32)

    packed = model(variables, tokens, pos, segments)
    other_doc1 = tokens.at[:, :n1].set((tokens[:, :n1] + 3) % V)
    packed_changed = model(variables, other_doc1, pos, segments)
    np.testing.assert_array_equal(packed[:, n1:], packed_changed[:, n1:])

    alone = model(variables, tokens[:, n1:])  # default positions 0.. and one segment
    np.testing.assert_allclose(packed[:, n1:], alone, atol=1e-5, rtol=1e-5)


def test_causal_segment_mask_values():
    mask = Mask.causal_segments(jnp.array([[1, 1, 2, 2]])).dense()
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
    assert mask.shape == (1, 1, 4, 4)
    np.testing.assert_array_equal(mask[0, 0], expected)


def np_rope(x_LxHxK: np.ndarray, pos_L: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE, written as an explicit 2x2 rotation of feature pairs (i, i + K/2)."""
    k = x_LxHxK.shape[-1]
    out = np.empty_like(x_LxHxK, dtype=np.float64)
    for i in range(k // 2):
        angle = pos_L[:, None] * theta ** (-2.0 * i / k)
        a, b = x_LxHxK[..., i], x_LxHxK[..., i + k // 2]
        out[..., i] = a * np.cos(angle) - b * np.sin(angle)
        out[..., i + k // 2] = a * np.sin(angle) + b * np.cos(angle)
    return out


def test_rope_matches_numpy_rotation():
    x = np.asarray(jax.random.normal(jax.random.key(2), (1, 10, 3, 8)))
    pos = np.array([[0, 1, 2, 3, 0, 1, 7, 50, 100, 9]])
    got = layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), 10000.0)
    np.testing.assert_allclose(got[0], np_rope(x[0], pos[0], 10000.0), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_position_difference():
    kq, kk = jax.random.split(jax.random.key(3))
    q = jax.random.normal(kq, (1, 1, 2, 16))
    k = jax.random.normal(kk, (1, 1, 2, 16))

    def score(pq: int, pk: int) -> jax.Array:
        rq = layers.apply_rope(q, jnp.array([[pq]]), 10000.0)
        rk = layers.apply_rope(k, jnp.array([[pk]]), 10000.0)
        return jnp.sum(rq * rk, axis=-1)

    np.testing.assert_allclose(score(5, 2), score(103, 100), atol=1e-5)
    np.testing.assert_allclose(score(0, 0), score(40, 40), atol=1e-5)
    assert not np.allclose(score(5, 2), score(5, 4), atol=1e-3)


# --- whole model against NumPy --------------------------------------------------------------


def np_layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p.get("bias", 0.0)


def np_activation(x, name):
    if name == "gelu":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    if name == "gelu_exact":
        return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))
    return np.maximum(x, 0)


def np_gpt(params, cfg: ModelConfig, tokens_L, pos_L, seg_L) -> np.ndarray:
    """One row through the whole model in float64 NumPy, written from the GPT-2 paper."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    n = len(tokens_L)
    x = p["token_embed"]["embedding"][tokens_L]
    if cfg.positions == "learned":
        x = x + p["position_embed"]["embedding"][pos_L]
    elif cfg.positions == "sinusoidal":
        inv = 1.0 / 10000 ** (np.arange(0, cfg.d_model, 2) / cfg.d_model)
        x = x + np.concatenate([np.sin(pos_L[:, None] * inv), np.cos(pos_L[:, None] * inv)], -1)
    allowed = np.tril(np.ones((n, n), bool)) & (seg_L[:, None] == seg_L[None, :])
    for i in range(cfg.n_layers):
        b = p[f"blocks_{i}"]
        h = np_layer_norm(x, b["ln_attn"], cfg.norm_eps)
        q, k, v = (
            np.einsum("ld,dhk->lhk", h, b["attn"][n]["kernel"]) + b["attn"][n]["bias"]
            for n in ("query", "key", "value")
        )
        if cfg.positions == "rope":
            q, k = np_rope(q, pos_L, cfg.rope_theta), np_rope(k, pos_L, cfg.rope_theta)
        scores = np.einsum("lhk,shk->hls", q, k) / np.sqrt(q.shape[-1])
        scores = np.where(allowed[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        att = np.einsum("hls,shk->lhk", probs, v)
        x = x + np.einsum("lhk,hkd->ld", att, b["attn"]["out"]["kernel"]) + b["attn"]["out"]["bias"]
        h = np_layer_norm(x, b["ln_mlp"], cfg.norm_eps)
        h = np_activation(h @ b["mlp"]["up"]["kernel"] + b["mlp"]["up"]["bias"], cfg.activation)
        x = x + h @ b["mlp"]["down"]["kernel"] + b["mlp"]["down"]["bias"]
    x = np_layer_norm(x, p["ln_final"], cfg.norm_eps)
    if cfg.tie_embeddings:
        return x @ p["token_embed"]["embedding"].T
    return x @ p["lm_head"]["kernel"]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(positions="learned", tie_embeddings=True, activation="gelu"),
        dict(positions="sinusoidal", tie_embeddings=False, activation="gelu_exact"),
        dict(positions="rope", tie_embeddings=True, activation="relu"),
    ],
)
def test_model_matches_numpy_reference(overrides):
    cfg = tiny(**overrides)
    variables = init(cfg, noisy=True)
    tokens = random_tokens(4, (1, L))
    segments = jnp.array([[1] * 5 + [2] * 9 + [3] * 2], jnp.int32)
    pos = jnp.array([list(range(5)) + list(range(9)) + list(range(2))], jnp.int32)
    got = forward(cfg)(variables, tokens, pos, segments)
    want = np_gpt(variables["params"], cfg, *(np.asarray(a[0]) for a in (tokens, pos, segments)))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got[0], want, atol=2e-5, rtol=1e-5)


# --- parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_every_parameter_has_logical_names(tie):
    cfg = tiny(tie_embeddings=tie)
    boxed = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, L), jnp.int32))["params"]
    known = {name for name, _ in LOGICAL_RULES}
    leaves = jax.tree.leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
        assert set(leaf.names) <= known, (jax.tree_util.keystr(path), leaf.names)


def expected_param_count(cfg: ModelConfig) -> int:
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    attn = 4 * (d * d + d)  # q, k, v, out: kernel + bias each
    mlp = d * f + f + f * d + d
    norms = 2 * 2 * d
    blocks = cfg.n_layers * (attn + mlp + norms)
    table = cfg.max_seq_len * d if cfg.positions == "learned" else 0
    head = 0 if cfg.tie_embeddings else d * v
    return v * d + table + blocks + 2 * d + head


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_tied_and_untied_param_counts(positions):
    tied_cfg = tiny(positions=positions, tie_embeddings=True)
    untied_cfg = tiny(positions=positions, tie_embeddings=False)
    tied, untied = abstract_params(tied_cfg), abstract_params(untied_cfg)
    assert "lm_head" not in tied
    assert untied["lm_head"]["kernel"].shape == (D, V)
    assert count_params(tied) == expected_param_count(tied_cfg)
    assert count_params(untied) == expected_param_count(untied_cfg)
    assert count_params(untied) - count_params(tied) == D * V
    # learned: 21248 / 23296 for this config, written out once to catch a wrong formula
    if positions == "learned":
        assert (count_params(tied), count_params(untied)) == (21248, 23296)
    table = MAX_LEN * D if positions == "learned" else 0
    assert non_embedding_params(tied, tied_cfg) == count_params(tied) - V * D - table
    assert non_embedding_params(untied, untied_cfg) == count_params(untied) - V * D - table


def test_count_params_on_boxed_and_abstract_trees():
    cfg = tiny()
    model = build_model(cfg)
    tokens = jnp.zeros((1, L), jnp.int32)
    boxed = model.init(jax.random.key(0), tokens)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    assert count_params(boxed) == count_params(abstract) == expected_param_count(cfg)


def test_no_bias_config_has_no_biases():
    params = abstract_params(tiny(use_bias=False))
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(params)]
    assert not [n for n in names if "bias" in n]


# --- dtypes and dropout ---------------------------------------------------------------------


def test_bf16_compute_keeps_f32_params_and_logits_close_to_f32():
    cfg32, cfg16 = tiny(), tiny(dtype="bfloat16")
    variables = init(cfg32, noisy=True)
    tokens = random_tokens(5)
    logits32 = forward(cfg32)(variables, tokens)
    logits16 = forward(cfg16)(variables, tokens)
    assert logits16.dtype == jnp.float32
    params16 = abstract_params(cfg16)
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.float32)}
    scale = float(jnp.abs(logits32).max())
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale)


@pytest.mark.parametrize("tie", [True, False])
def test_bf16_compute_gradients_point_where_f32_ones_do(tie):
    from flaxlm.losses.objectives import causal_lm_loss

    cfg32, cfg16 = tiny(tie_embeddings=tie), tiny(tie_embeddings=tie, dtype="bfloat16")
    variables, tokens = init(cfg32, noisy=True), random_tokens(7, (2, L + 1))

    def loss(params, cfg):
        logits = GPT(cfg).apply({"params": params}, tokens[:, :-1])
        return causal_lm_loss(logits, tokens[:, 1:], jnp.ones((2, L)))[0]

    g32, g16 = (jax.jit(jax.grad(loss), static_argnums=1)(variables["params"], c)
                for c in (cfg32, cfg16))  # fmt: skip
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16), strict=True):
        assert b.dtype == jnp.float32
        a, b = np.ravel(a), np.ravel(b)
        if np.linalg.norm(a) < 1e-3:  # key biases: softmax ignores them, the gradient is 0
            assert np.linalg.norm(b) < 1e-2
            continue
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cosine > 0.999, cosine


def test_bf16_params_run_and_return_f32_logits():
    cfg = tiny(dtype="bfloat16", param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(abstract_params(cfg))} == {jnp.dtype(jnp.bfloat16)}
    variables = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init(tiny()))
    logits = forward(cfg)(variables, random_tokens(6))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_dropout_only_when_not_deterministic():
    cfg = tiny(dropout=0.2)
    model, variables = forward(cfg), init(cfg)
    tokens = random_tokens(7)
    a, b = model(variables, tokens), model(variables, tokens)
    np.testing.assert_array_equal(a, b)

    def train(seed: int) -> jax.Array:
        rngs = {"dropout": jax.random.key(seed)}
        return model(variables, tokens, deterministic=False, rngs=rngs)

    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), a)


# --- reuse and sharding hooks ---------------------------------------------------------------


def test_post_ln_block_with_bidirectional_mask_sees_the_future():
    cfg = tiny()
    block = layers.Block(cfg, norm_placement="post")
    x = jax.random.normal(jax.random.key(8), (1, 8, D))
    mask = Mask.segments(jnp.ones((1, 8), jnp.int32))
    pos = jnp.arange(8)[None]
    variables = nn.meta.unbox(block.init(jax.random.key(0), x, mask, pos))
    y = block.apply(variables, x, mask, pos)
    y_changed = block.apply(variables, x.at[:, -1].add(1.0), mask, pos)
    assert y.shape == x.shape
    assert not np.allclose(y[:, 0], y_changed[:, 0])  # position 0 attends to position 7


def test_bad_norm_placement_is_named():
    cfg = tiny()
    x = jnp.zeros((1, 4, D))
    block = layers.Block(cfg, norm_placement="sandwich")
    with pytest.raises(ValueError, match="sandwich"):
        block.init(
            jax.random.key(0), x, Mask.causal_segments(jnp.ones((1, 4))), jnp.arange(4)[None]
        )


def test_sharded_params_and_apply_under_mesh_and_logical_rules():
    # The training stack derives shardings from the logical names (eval_shape of init under
    # the rules) and jits init/apply under the mesh; both trace every param initialiser.
    from flaxlm.config import MeshConfig
    from flaxlm.parallel.sharding import build_mesh, logical_to_sharding

    cfg = tiny()
    model, variables, tokens = GPT(cfg), init(cfg), random_tokens(9)
    mesh = build_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
        shardings = logical_to_sharding(nn.get_partition_spec(abstract), mesh)
        sharded = jax.device_put(variables, shardings)
        logits = jax.jit(model.apply)(sharded, tokens)
    spec = shardings["params"]["blocks_0"]["attn"]["query"]["kernel"].spec
    assert tuple(spec) == (("fsdp", "expert", "context"), "tensor", None)
    np.testing.assert_allclose(logits, forward(cfg)(variables, tokens), atol=1e-5)
