"""On an NVIDIA GPU: cuDNN flash attention against the reference attention (forward and
gradients), and bf16 training against fp32. Marked ``gpu``; skipped where jax sees no GPU
(this CPU machine). ``benchmarks/gpu_check.sh`` installs ``.[cuda12,dev]`` and runs them.

Tolerances: bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4 %), so attention
outputs and gradients from bf16 inputs are compared relative to their largest entry, at 2 %
(cuDNN's online softmax sums in another order than the reference). The train-step test
compares bf16 compute (fp32 parameters, fp32 accumulation) with fp32 over 3 steps of the same
batches: losses within 0.1 %, gradient norms within 1 %. The same harness on the CPU, with XLA
attention in place of cuDNN, measured 0.3-0.7 % (attention), 8e-6 (losses), 6e-4 (norms).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from flaxlm.config import load_config
from flaxlm.families import build_model, family_of
from flaxlm.train.batches import put_train_batch
from flaxlm.train.program import TrainProgram
from flaxlm.train.step import step_controls


def _gpu_present() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:  # no GPU backend (CPU-only jaxlib, or JAX_PLATFORMS=cpu)
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _gpu_present(), reason="needs an NVIDIA GPU (benchmarks/gpu_check.sh)"),
]

ATTENTION_RTOL = 2e-2
LOSS_RTOL = 1e-3
GRAD_NORM_RTOL = 1e-2


def _close(actual, reference, rtol: float) -> float:
    """The largest difference, relative to the reference's largest entry (asserted)."""
    actual, reference = np.asarray(actual, np.float32), np.asarray(reference, np.float32)
    error = float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))
    assert error < rtol, error
    return error


def _qkv(batch=2, length=512, heads=4, head_dim=64, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (batch, length, heads, head_dim)
    q, k, v, dout = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), dout


@pytest.mark.parametrize("mask", ["causal", "padding", "full"])
def test_cudnn_attention_matches_the_reference(mask):
    q, k, v, dout = _qkv()
    kwargs = {"is_causal": mask == "causal"}
    if mask == "padding":  # rows of 512 and 300 real keys (BERT padding)
        kwargs["key_value_seq_lengths"] = jnp.array([512, 300], jnp.int32)

    def loss(impl, dtype, q, k, v):
        out = jax.nn.dot_product_attention(
            q.astype(dtype), k.astype(dtype), v.astype(dtype), implementation=impl, **kwargs
        )
        return jnp.sum(out.astype(jnp.float32) * dout), out

    grad = jax.value_and_grad(loss, argnums=(2, 3, 4), has_aux=True)
    (_, out), grads = jax.jit(grad, static_argnums=(0, 1))("cudnn", jnp.bfloat16, q, k, v)
    (_, ref), ref_grads = jax.jit(grad, static_argnums=(0, 1))("xla", jnp.float32, q, k, v)
    _close(out, ref, ATTENTION_RTOL)
    for g, r in zip(grads, ref_grads, strict=True):  # dq, dk, dv
        _close(g, r, ATTENTION_RTOL)


def test_model_logits_with_cudnn_match_xla():
    def model_config(impl: str):
        overrides = [
            "data.seq_len=256",
            "model.max_seq_len=256",
            "model.d_model=256",
            "model.n_heads=4",
            "model.dtype=bfloat16",
            f"model.attention_impl={impl}",
        ]
        return load_config(REPO / "configs/gpt_tiny.yaml", overrides, check_paths=False).model

    tokens_BxL = jax.random.randint(jax.random.key(0), (4, 256), 7, 384)
    variables = build_model(model_config("xla")).init(jax.random.key(1), tokens_BxL[:1])
    logits = {
        impl: jax.jit(build_model(model_config(impl)).apply)(variables, tokens_BxL)
        for impl in ("cudnn", "xla")
    }
    _close(logits["cudnn"], logits["xla"], ATTENTION_RTOL)


def train_losses(dtype: str, steps: int = 3, *overrides: str) -> tuple[list[float], list[float]]:
    """Losses and gradient norms of ``steps`` train steps of a small GPT on fixed random
    batches, with compute dtype ``dtype`` (parameters always fp32)."""
    cfg = load_config(
        REPO / "configs/gpt_tiny.yaml",
        ["data.seq_len=256", "model.max_seq_len=256", "model.d_model=256", "model.n_heads=4",
         "model.d_ff=1024", "train.batch_size=8", f"model.dtype={dtype}", *overrides],
        check_paths=False,
    )  # fmt: skip
    family = family_of(cfg)
    ms = TrainProgram.build(cfg, family)
    state = ms.fresh()
    rng = np.random.default_rng(0)
    losses, norms = [], []
    for _ in range(steps):
        batch = put_train_batch(family.synthetic_batch(cfg, rng), ms.mesh, 1)
        state, metrics = ms.train_step(state, batch, step_controls())
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return losses, norms


def test_bf16_train_steps_match_fp32():
    losses, norms = train_losses("bfloat16")
    ref_losses, ref_norms = train_losses("float32")
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    np.testing.assert_allclose(norms, ref_norms, rtol=GRAD_NORM_RTOL)
