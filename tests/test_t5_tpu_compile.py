"""The t5 train step and its cached decode compile for a real TPU topology (``v5e:2x2``) with
the TPU compiler on this CPU-only machine: self-attention (with the relative position bias)
through the Pallas flash kernel, cross-attention (decoder queries over encoder keys, segment
ids on both sides) through splash, all inside ``shard_map`` over a data x fsdp x tensor mesh.
Skipped where libtpu is not installed."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

import flaxlm.families  # noqa: F401  (registers t5)
from flaxlm.config import load_config
from flaxlm.families import build_model
from flaxlm.models.t5_decode import greedy
from flaxlm.parallel.sharding import BATCH_AXES, LOGICAL_RULES, build_mesh
from flaxlm.tools import targets
from flaxlm.tools.plan import plan
from flaxlm.train.state import abstract_state, param_shardings

pytestmark = [
    pytest.mark.skipif(
        not targets.libtpu_installed(), reason="needs libtpu: pip install -e '.[tpu]'"
    ),
    # Nothing runs, so XLA's backend optimizations only slow the compiles (conftest.py).
    pytest.mark.usefixtures("unoptimized_compiles"),
]

# Lengths the kernels tile (128), head dim 64, every mesh axis used.
TPU_TINY = (
    "data.seq_len=128", "seq2seq.target_len=128", "model.max_seq_len=128", "model.d_model=128",
    "model.n_heads=2", "model.n_layers=1", "model.attention_impl=auto", "train.batch_size=4",
    "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
)  # fmt: skip


def _config(*overrides: str):
    return load_config(REPO / "configs" / "t5_tiny.yaml", [*TPU_TINY, *overrides], False)


def test_t5_train_step_compiles_with_flash_and_splash(monkeypatch):
    texts = []
    compile_ = jax.stages.Lowered.compile

    def keep_text(self, *args, **kwargs):
        compiled = compile_(self, *args, **kwargs)
        texts.append(compiled.as_text())
        return compiled

    monkeypatch.setattr(jax.stages.Lowered, "compile", keep_text)
    report = plan(_config(), "v5e:2x2")
    assert report["compiler"] == "tpu" and report["devices"] == 4 and report["fits"] is True
    kernels = [line for line in texts[-1].splitlines() if "tpu_custom_call" in line]
    assert len(kernels) == report["mosaic_kernels"]
    # Encoder and decoder self-attention: flash forward + its dq and dkv kernels each.
    assert sum("jit(flash_attention)" in k for k in kernels) == 6
    # Cross-attention: splash forward, dq and dkv (segment ids on queries and keys).
    assert sum("splash_mqa" in k for k in kernels) == 3


def test_t5_cached_decode_compiles():
    """Encoder once, cross K/V once, then 16 steps of the self-attention cache (lax.scan)."""
    cfg = _config()
    model = build_model(cfg.model)
    mesh = build_mesh(cfg.mesh, targets.tpu_devices("v5e:2x2"))
    import optax

    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state(model, optax.sgd(0.1), cfg.data.seq_len).params,
        param_shardings(model, mesh, cfg.data.seq_len),
    )
    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    prompt_BxS = jax.ShapeDtypeStruct((4, 128), jnp.int32, sharding=rows)
    run = jax.jit(functools.partial(greedy, model, steps=16))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        compiled = run.lower(params, prompt_BxS, prompt_BxS).compile()
    assert "jit(flash_attention)" in compiled.as_text()  # the encoder, with its bias
    assert jax.tree.leaves(compiled.out_info)[0].shape == (4, 16)
