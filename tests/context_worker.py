"""Run by tests/test_context_parallel.py in a fresh process with 8 simulated CPU devices.

python tests/context_worker.py train OUT_JSON MESH...   (MESH: fsdp,context, e.g. 2,4)
python tests/context_worker.py attention OUT_JSON
python tests/context_worker.py bert OUT_JSON MESH...

``train``: the tiny Llama (configs/llama_tiny.yaml: RoPE, GQA) on packed rows (several
documents per row, positions restarting at each), 3 AdamW steps per MESH and once on one
device; writes each run's losses, first-step gradients and final parameters.
``attention``: context attention through the splash kernel (interpret mode) on context=2
against the dense one-device attention, forward and gradients; and the one-line refusal of a
KV-cache decode step under context=2.
``bert``: the tiny BERT (bidirectional, learned positions, post-norm) on packed rows with
masked positions, MLM + NSP logits and the gradients of a loss of both, per MESH and on one
device.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from flaxlm.config import load_config  # noqa: E402
from flaxlm.families import build_model, family_of  # noqa: E402
from flaxlm.models.attention import attention, softmax_attention  # noqa: E402
from flaxlm.models.context_parallel import load_balanced_order  # noqa: E402
from flaxlm.models.masks import Mask  # noqa: E402
from flaxlm.parallel.sharding import LOGICAL_RULES, build_mesh  # noqa: E402
from flaxlm.train.program import TrainProgram  # noqa: E402
from flaxlm.train.step import step_controls  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def packed_batch(batch: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
    """Rows of 2-4 documents each (uneven lengths), positions restarting per document, the
    last document of some rows padding (segment 0, masked out of the loss)."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(7, vocab, (batch, seq_len + 1), dtype=np.int32)
    segments = np.zeros((batch, seq_len), np.int32)
    positions = np.zeros((batch, seq_len), np.int32)
    for r in range(batch):
        cuts = np.sort(rng.choice(np.arange(3, seq_len - 2), rng.integers(1, 4), replace=False))
        bounds = [0, *cuts.tolist(), seq_len]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            segments[r, a:b] = s + 1
            positions[r, a:b] = np.arange(b - a)
        if r % 2:
            segments[r, bounds[-2] :] = 0  # padding
    return {
        "inputs": tokens[:, :-1].copy(),
        "targets": tokens[:, 1:].copy(),
        "positions": positions,
        "segment_ids": segments,
        "loss_mask": (segments > 0).astype(np.float32),
    }


def train(mesh_arg: str | None) -> dict:
    """3 steps on MESH (``fsdp,context``), or on one device for None."""
    overrides = ["mesh.data=1", "train.batch_size=8", "data.seq_len=32", "model.n_layers=1"]
    if mesh_arg is None:
        overrides += ["mesh.fsdp=1", "mesh.context=1"]
    else:
        fsdp, context = mesh_arg.split(",")
        overrides += [f"mesh.fsdp={fsdp}", f"mesh.context={context}"]
    cfg = load_config(REPO / "configs/llama_tiny.yaml", overrides, check_paths=False)
    family = family_of(cfg)
    devices = jax.devices()[:1] if mesh_arg is None else None
    mesh = build_mesh(cfg.mesh, devices)
    ms = TrainProgram.build(cfg, family, mesh=mesh)
    state = ms.fresh()
    host = packed_batch(8, 32, cfg.model.vocab_size)
    batch = {k: jnp.asarray(v)[None] for k, v in host.items()}

    def loss_of(params):
        scale = family.loss_scales(cfg, host)
        mb = {k: v[0] for k, v in batch.items()}
        return family.loss(params, mb, ms.model, cfg, scale, jax.random.key(0), True)[0]

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        grads = jax.jit(jax.grad(loss_of))(state.params)
    losses = []
    for _ in range(3):
        state, metrics = ms.train_step(state, batch, step_controls())
        losses.append(float(metrics["loss"]))
    flat = lambda tree: [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(tree)]  # noqa: E731
    return {"losses": losses, "grads": flat(grads), "params": flat(state.params)}


def bert(mesh_arg: str | None) -> dict:
    """BERT's forward and gradients on MESH (``fsdp,context``), or on one device for None."""
    overrides = ["mesh.data=1", "model.n_layers=2"]
    fsdp, context = ("1", "1") if mesh_arg is None else mesh_arg.split(",")
    overrides += [f"mesh.fsdp={fsdp}", f"mesh.context={context}"]
    cfg = load_config(REPO / "configs/bert_tiny.yaml", overrides, check_paths=False)
    model = build_model(cfg.model)
    host = packed_batch(4, 32, cfg.model.vocab_size)
    rng = np.random.default_rng(2)
    masked = np.sort(rng.choice(32, (4, 5)), axis=1).astype(np.int32)  # across all shards
    types = (np.arange(32) >= 13).astype(np.int32)[None].repeat(4, 0)
    args = (host["inputs"], host["positions"], host["segment_ids"], types, masked)
    params = jax.jit(model.init)(jax.random.key(0), *map(jnp.asarray, args))["params"]
    params = nn.meta.unbox(params)

    def loss(p, *a):
        out = model.apply({"params": p}, *a)
        return jnp.sum(jnp.sin(out["mlm_logits"])) + jnp.sum(jnp.cos(out["nsp_logits"])), out

    devices = jax.devices()[:1] if mesh_arg is None else None
    mesh = build_mesh(cfg.mesh, devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, *args)
    flat = lambda tree: [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(tree)]  # noqa: E731
    return {"loss": float(value), "out": flat(out), "grads": flat(grads)}


def splash() -> dict:
    """Splash (interpret) under context=2 vs the dense reference: forward and d(q, k, v)."""
    rng = np.random.default_rng(0)
    b, length, heads, kv_heads, dim = 2, 256, 2, 1, 64
    q = jnp.asarray(rng.normal(size=(b, length, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, length, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, length, kv_heads, dim)), jnp.float32)
    seg = np.ones((b, length), np.int32)
    seg[0, 100:] = 2
    seg[1, 200:] = 3
    order = load_balanced_order(length, 2)
    cot = jnp.asarray(rng.normal(size=(b, length, heads, dim)), jnp.float32)

    def reference(q, k, v):
        mask = Mask.causal_segments(jnp.asarray(seg)).dense()
        out = softmax_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), mask)
        return jnp.sum(out * cot), out

    # The splash run sees the rows in load-balanced order, as the model feeds them.
    def sharded(q, k, v):
        mask = Mask.causal_segments(jnp.asarray(seg[:, order]))
        out = attention(q[:, order], k[:, order], v[:, order], mask, "splash")
        return jnp.sum(out * cot[:, order]), out[:, np.argsort(order)]

    cfg = load_config(None, ["mesh.data=1", "mesh.context=2"])
    mesh = build_mesh(cfg.mesh, jax.devices()[:2])
    (_, ref), ref_grads = jax.value_and_grad(reference, (0, 1, 2), has_aux=True)(q, k, v)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        fn = jax.jit(jax.value_and_grad(sharded, (0, 1, 2), has_aux=True))
        (_, out), grads = fn(q, k, v)
    errors = [float(jnp.max(jnp.abs(out - ref)))]
    errors += [float(jnp.max(jnp.abs(g - r))) for g, r in zip(grads, ref_grads, strict=True)]
    return {"errors": errors, "decode": decode_refusal(mesh)}


def decode_refusal(mesh) -> str:
    """The error of a KV-cache decode step (one query over 8 slots) under context=2."""
    q, kv = jnp.zeros((2, 1, 2, 8)), jnp.zeros((2, 8, 2, 8))
    mask = Mask.decode(jnp.ones((2, 1), jnp.int32), jnp.ones((2, 8), jnp.int32), 3)
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            attention(q, kv, kv, mask)
    except ValueError as e:
        return str(e)
    return ""


if __name__ == "__main__":
    mode, out_path, *meshes = sys.argv[1:]
    if mode == "attention":
        result = splash()
    elif mode == "bert":
        result = {"1": bert(None)} | {m: bert(m) for m in meshes}
    else:
        result = {"1": train(None)} | {m: train(m) for m in meshes}
    Path(out_path).write_text(json.dumps(result))
