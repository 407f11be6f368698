"""Remat policies (``model.remat``, flaxlm/models/layer_stack.py) change what the backward
pass recomputes, never the math: the loss and every gradient equal those of ``remat: none``.
How much memory each keeps is a TPU compile (tests/test_tpu_compile.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from flaxlm.config import CHOICES, ModelConfig
from flaxlm.losses.objectives import causal_lm_loss
from flaxlm.models import GPT
from flaxlm.models.layer_stack import NAMED_POLICIES

# A Llama-style block (RMSNorm, SwiGLU, RoPE, grouped-query attention): every tagged projection.
LLAMA = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16,
    positions="rope", norm="rmsnorm", activation="swiglu", use_bias=False, tie_embeddings=False,
)  # fmt: skip
POLICIES = [r for r in CHOICES["model.remat"] if r != "none"]
TOKENS = jax.random.randint(jax.random.key(0), (2, 17), 0, 64)
# Compiling the policies' gradients is the cost here, not running them (conftest.py).
pytestmark = pytest.mark.usefixtures("unoptimized_compiles")


def _loss(params, cfg: ModelConfig):
    logits = GPT(cfg).apply({"params": params}, TOKENS[:, :-1])
    return causal_lm_loss(logits, TOKENS[:, 1:], jnp.ones((2, 16)))[0]


_loss_and_grads = jax.jit(jax.value_and_grad(_loss), static_argnums=1)


@pytest.mark.parametrize("scan", [True, False])
def test_every_policy_gives_the_loss_and_gradients_of_no_remat(scan):
    """Scanned blocks (nn.remat around the scan step) take every policy; unscanned ones
    (nn.remat around each Block) the two that differ most."""
    base = dataclasses.replace(LLAMA, scan_layers=scan)
    params = nn.meta.unbox(GPT(base).init(jax.random.key(1), TOKENS[:, :-1]))["params"]
    want_loss, want_grads = _loss_and_grads(params, base)
    assert set(NAMED_POLICIES) <= set(POLICIES)
    # offload_* run on the CPU too: its "host" memory is the same memory.
    for remat in POLICIES if scan else ["full", "offload_all_proj"]:
        loss, grads = _loss_and_grads(params, dataclasses.replace(base, remat=remat))
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=remat)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            want = want_grads
            for key in path:
                want = want[key.key]
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7, err_msg=f"{remat} {path}")


def _saved(remat: str) -> str:
    """What the backward pass keeps from the forward pass, as JAX describes it."""
    cfg = dataclasses.replace(LLAMA, remat=remat)
    params = nn.meta.unbox(GPT(cfg).init(jax.random.key(1), TOKENS[:, :-1]))["params"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(lambda p: _loss(p, cfg), params)
    return out.getvalue()


def test_named_policies_keep_the_named_projections_and_full_keeps_none():
    """save_qkv_proj keeps q, k and v (one named residual each per layer), save_all_proj also
    the attention's output and the MLP's up, gate and hidden activations; full keeps only the
    blocks' inputs."""
    full, qkv, every = _saved("full"), _saved("save_qkv_proj"), _saved("save_all_proj")
    layers = LLAMA.n_layers
    assert "named 'query_proj'" not in full
    for name in ("query_proj", "key_proj", "value_proj"):
        assert qkv.count(f"named '{name}'") == layers, qkv
    assert "named 'mlp_up'" not in qkv and "named 'attention_out'" not in qkv
    for name in ("attention_out", "mlp_up", "mlp_gate", "mlp_hidden"):
        assert every.count(f"named '{name}'") == layers, every
