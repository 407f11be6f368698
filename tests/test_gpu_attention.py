"""The GPU attention kernels checked on the CPU: the Pallas GPU flash kernel
(flaxlm/models/gpu_flash.py) in Pallas interpret mode, and the arguments flaxlm gives cuDNN
(``jax.nn.dot_product_attention`` run by XLA with the same arguments), forward and gradients
against softmax attention over the dense mask, for every mask flaxlm builds (packed causal,
BERT padding, the unified objective's per-row prefix LM) and for grouped-query / multi-query
heads; and which kernel ``auto`` takes on a GPU. Compiling them for H100s is
tests/test_gpu_compile.py; running them on one is tests/test_gpu.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax.experimental.pallas.ops.gpu.attention")

from flaxlm.models import attention as attention_module  # noqa: E402
from flaxlm.models import gpu_flash  # noqa: E402
from flaxlm.models.attention import attention, gpu_kernel, repeat_kv, softmax_attention  # noqa: E402
from flaxlm.models.gpu_flash import gpu_flash_attention, supports  # noqa: E402
from flaxlm.models.masks import Mask  # noqa: E402
from flaxlm.models.platform import cudnn_supports  # noqa: E402

# Small: interpret mode runs the kernel's tiles one by one in Python-driven loops.
B, L, H, K = 2, 32, 2, 16


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16: two query and two key tiles per row, forward and backward, so the online
    softmax, the causal tile skipping and segments that cross tiles are all exercised."""
    monkeypatch.setattr(gpu_flash, "BLOCKS", (16,))
    monkeypatch.setattr(gpu_flash, "BACKWARD_BLOCK", 16)


def _qkv(kv_heads: int = H, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(kq, (B, L, H, K), dtype)
    k, v = (jax.random.normal(key, (B, L, kv_heads, K), dtype) for key in (kk, kv))
    return q, k, v


def _masks() -> dict[str, Mask]:
    packed = jnp.array([[1] * 12 + [2] * 15 + [3] * 5, [1] * L])
    padded = jnp.array([[1] * 25 + [0] * 7, [1] * L])  # BERT: padding is segment 0
    return {
        "packed_causal": Mask.causal_segments(packed),
        "padded_bidirectional": Mask.segments(padded),
        # rows: a prefix-LM row inside the first document, and a causal row (prefix 0)
        "prefix_lm": Mask.prefix_lm(packed, jnp.array([7, 0])),
        "prefix_lm_bidirectional": Mask.prefix_lm(padded, jnp.array([L, 20])),
    }


def _reference(q, k, v, mask: Mask):
    heads = q.shape[2]
    return softmax_attention(q, repeat_kv(k, heads), repeat_kv(v, heads), mask.dense())


def _value_and_grads(fn, q, k, v, mask):
    def loss(q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, mask).astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)


def _assert_matches(fn, q, k, v, mask, atol=5e-5):
    (got, got_grads), (want, want_grads) = (
        _value_and_grads(fn, q, k, v, mask),
        _value_and_grads(_reference, q, k, v, mask),
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=atol, err_msg=f"d{name}")


@pytest.mark.parametrize("kind", list(_masks()))
def test_gpu_flash_matches_the_reference_values_and_gradients(kind, small_tiles):
    q, k, v = _qkv()
    mask = _masks()[kind]
    np.testing.assert_allclose(
        gpu_flash_attention(q, k, v, mask), _reference(q, k, v, mask), atol=2e-5
    )
    _assert_matches(gpu_flash_attention, q, k, v, mask)


@pytest.mark.parametrize("kv_heads", [1], ids=["mqa"])
def test_gpu_flash_grouped_heads(kv_heads, small_tiles):
    q, k, v = _qkv(kv_heads)
    _assert_matches(gpu_flash_attention, q, k, v, _masks()["packed_causal"])


def test_gpu_flash_in_bf16_stays_bf16_and_close_to_fp32(small_tiles):
    q, k, v = _qkv(dtype=jnp.bfloat16)
    mask = _masks()["packed_causal"]
    out = gpu_flash_attention(q, k, v, mask)
    assert out.dtype == jnp.bfloat16
    want = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), mask)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=0.03)


@pytest.mark.parametrize("kind", list(_masks()))
def test_the_cudnn_call_arguments_give_the_reference(kind, monkeypatch):
    """What flaxlm hands cuDNN (is_causal, the segments as a mask, the prefix split), run
    by XLA's implementation of the same API: cuDNN itself needs a GPU (tests/test_gpu.py)."""
    q, k, v = _qkv(1)
    real = jax.nn.dot_product_attention

    def as_xla(*args, implementation=None, **kwargs):
        assert implementation == "cudnn"
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(attention_module.jax.nn, "dot_product_attention", as_xla)
    _assert_matches(lambda *a: attention(*a, "cudnn"), q, k, v, _masks()[kind], atol=2e-5)


def test_auto_on_gpu_takes_the_flash_kernel_then_cudnn_then_xla():
    mask = _masks()["packed_causal"]
    q32, q16 = jnp.zeros((B, L, H, K)), jnp.zeros((B, L, H, K), jnp.bfloat16)
    assert gpu_kernel(q32, mask) == gpu_kernel(q16, mask) == "triton"
    # 24 positions: no tile of 16 or more divides it. cuDNN takes bf16, not fp32.
    odd = Mask.causal_segments(jnp.ones((B, 24), jnp.int32))
    assert gpu_kernel(q16[:, :24], odd) == "cudnn"
    assert gpu_kernel(q32[:, :24], odd) == "xla"
    # head dim 96 is no power of two: cuDNN (a multiple of 8, <= 128) in bf16
    assert gpu_kernel(jnp.zeros((B, L, H, 96), jnp.bfloat16), mask) == "cudnn"
    decode = Mask.decode(jnp.ones((B, 1), jnp.int32), jnp.ones((B, L), jnp.int32), 3)
    assert gpu_kernel(q16[:, :1], decode) == "xla"  # a KV-cache step: the dense path
    assert supports(2048, 128) and not supports(24, 64) and not supports(32, 96)
    assert cudnn_supports(jnp.float16, 128) and not cudnn_supports(jnp.bfloat16, 256)
    assert not cudnn_supports(jnp.float32, 64)


def test_triton_impl_on_an_untileable_shape_runs_the_next_kernel():
    q, k, v = (x[:, :24] for x in _qkv())
    mask = Mask.causal_segments(jnp.ones((B, 24), jnp.int32))
    with pytest.raises(ValueError, match="not length 24, head dim 16"):
        gpu_flash_attention(q, k, v, mask)
    np.testing.assert_allclose(
        attention(q, k, v, mask, "triton"), _reference(q, k, v, mask), atol=2e-5
    )


def _gpu_present() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend (CPU-only jaxlib, or JAX_PLATFORMS=cpu)
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_present(), reason="needs an NVIDIA GPU (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("kind", ["packed_causal", "prefix_lm"])
def test_gpu_flash_compiled_by_triton_matches_the_reference(kind):
    """On a real GPU: the kernel compiled by Triton (not interpreted), bf16 at 512 positions,
    forward and gradients within 2 % of the fp32 reference (bf16 rounding, as tests/test_gpu.py)."""
    keys = jax.random.split(jax.random.key(7), 3)
    q, k, v = (jax.random.normal(key, (2, 512, 4, 64), jnp.bfloat16) for key in keys)
    segments = jnp.array([[1] * 200 + [2] * 312, [1] * 512])
    mask = {
        "packed_causal": Mask.causal_segments(segments),
        "prefix_lm": Mask.prefix_lm(segments, jnp.array([100, 0])),
    }[kind]
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    outputs = (jax.jit(gpu_flash_attention)(q, k, v, mask), _reference(*f32, mask))
    got_grads = _value_and_grads(gpu_flash_attention, q, k, v, mask)[1]
    want_grads = _value_and_grads(_reference, *f32, mask)[1]
    for g, w in [outputs, *zip(got_grads, want_grads, strict=True)]:
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.max(np.abs(g - w)) / np.max(np.abs(w)) < 2e-2
