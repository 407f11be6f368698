"""The causal-LM loss against a plain-NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.losses.objectives import causal_lm_loss


def _numpy_reference(logits, targets, mask, smoothing, z):
    logits = logits.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = logits - lse[..., None]
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    uniform = -logp.mean(-1)
    objective = (1 - smoothing) * ce + smoothing * uniform + z * lse**2
    return (objective * mask).sum(), (ce * mask).sum()


@pytest.mark.parametrize("smoothing, z", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-4), (0.2, 1e-3)])
def test_matches_numpy(smoothing, z):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 5))
    mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
    total, metrics = causal_lm_loss(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), smoothing, z
    )
    ref_total, ref_ce = _numpy_reference(logits, targets, mask, smoothing, z)
    assert float(total) == pytest.approx(ref_total, rel=1e-5)
    assert float(metrics["ce_sum"]) == pytest.approx(ref_ce, rel=1e-5)
    assert float(metrics["n_tokens"]) == mask.sum()
    correct = ((logits.argmax(-1) == targets) * mask).sum()
    assert float(metrics["correct"]) == correct


def test_masked_positions_do_not_count():
    logits = jnp.zeros((1, 4, 7))
    targets = jnp.array([[1, 2, 3, 4]])
    full, _ = causal_lm_loss(logits, targets, jnp.ones((1, 4)))
    half, metrics = causal_lm_loss(logits, targets, jnp.array([[1.0, 1.0, 0.0, 0.0]]))
    assert float(full) == pytest.approx(4 * np.log(7))
    assert float(half) == pytest.approx(2 * np.log(7))
    assert float(metrics["n_tokens"]) == 2
