"""The TPU attention kernel (flaxlm/models/splash.py) run on the CPU in Pallas interpret mode:
forward and gradients against softmax attention over the dense mask, for every mask flaxlm
builds (packed causal, BERT padding, the unified objective's per-row prefix LM) and for
grouped-query / multi-query heads. Compiling it for a TPU is tests/test_tpu_compile.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")

from flaxlm.models.attention import attention, repeat_kv, softmax_attention  # noqa: E402
from flaxlm.models.masks import Mask  # noqa: E402
from flaxlm.models.splash import splash_attention  # noqa: E402

B, L, H, K = 2, 128, 4, 32


def _qkv(kv_heads: int = H):
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(kq, (B, L, H, K))
    k, v = (jax.random.normal(key, (B, L, kv_heads, K)) for key in (kk, kv))
    return q, k, v


def _masks() -> dict[str, Mask]:
    packed = jnp.array([[1] * 50 + [2] * 60 + [3] * 18, [1] * L])
    padded = jnp.array([[1] * 100 + [0] * 28, [1] * L])  # BERT: padding is segment 0
    return {
        "packed_causal": Mask.causal_segments(packed),
        "padded_bidirectional": Mask.segments(padded),
        # rows: a prefix-LM row inside the first document, a causal row (0), an MLM row (L)
        "prefix_lm": Mask.prefix_lm(packed, jnp.array([30, 0])),
        "prefix_lm_bidirectional": Mask.prefix_lm(padded, jnp.array([L, 70])),
    }


def _reference(q, k, v, mask: Mask):
    heads = q.shape[2]
    return softmax_attention(q, repeat_kv(k, heads), repeat_kv(v, heads), mask.dense())


def _value_and_grads(fn, q, k, v, mask):
    def loss(q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, mask)))

    return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)


@pytest.mark.parametrize("kind", list(_masks()))
def test_splash_matches_the_reference_values_and_gradients(kind):
    q, k, v = _qkv()
    mask = _masks()[kind]
    np.testing.assert_allclose(
        splash_attention(q, k, v, mask), _reference(q, k, v, mask), atol=2e-5
    )
    (got, got_grads), (want, want_grads) = (
        _value_and_grads(splash_attention, q, k, v, mask),
        _value_and_grads(_reference, q, k, v, mask),
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_splash_grouped_and_multi_query_heads(kv_heads):
    q, k, v = _qkv(kv_heads)
    mask = _masks()["packed_causal"]
    (got, got_grads), (want, want_grads) = (
        _value_and_grads(splash_attention, q, k, v, mask),
        _value_and_grads(_reference, q, k, v, mask),
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=5e-5)


@pytest.mark.parametrize("impl", ["xla", "flaxlm"])
@pytest.mark.parametrize("kind", ["prefix_lm", "packed_causal"])
def test_every_impl_takes_the_same_masks_and_grouped_heads(impl, kind):
    """The dense-mask paths: xla splits the prefix LM like splash does; flaxlm repeats the
    key/value heads. Both equal the reference, GQA included."""
    q, k, v = _qkv(2)
    mask = _masks()[kind]
    np.testing.assert_allclose(attention(q, k, v, mask, impl), _reference(q, k, v, mask), atol=2e-5)


def test_a_length_the_kernel_cannot_tile_falls_back_to_xla():
    q, k, v = (x[:, :96] for x in _qkv())
    mask = Mask.causal_segments(jnp.ones((B, 96), jnp.int32))
    with pytest.raises(ValueError, match="multiples of 128, not 96"):
        splash_attention(q, k, v, mask)
    np.testing.assert_allclose(
        attention(q, k, v, mask, "splash"), _reference(q, k, v, mask), atol=2e-5
    )


def test_decode_masks_run_the_dense_path_under_splash():
    """A KV-cache step (queries at an offset over the cache) is not a kernel shape: splash
    gives the same result as the dense reference."""
    q, k, v = _qkv()
    segments = jnp.ones((B, L), jnp.int32)
    mask = Mask.decode(segments[:, :1], segments, jnp.asarray(5))
    got = attention(q[:, :1], k, v, mask, "splash")
    np.testing.assert_allclose(got, _reference(q[:, :1], k, v, mask), atol=2e-5)
