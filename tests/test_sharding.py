"""The same training run on 1 device and on 8 simulated devices gives the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from conftest import tiny_config

from flaxlm.checkpoint import Checkpointer
from flaxlm.models import build_model
from flaxlm.optim import make_optimizer
from flaxlm.sharding import build_mesh
from flaxlm.train import train
from flaxlm.train.state import abstract_state, state_shardings

WORKER = Path(__file__).parent / "sharded_worker.py"


MESHES = ("8,1,1", "1,8,1", "1,4,2", "2,2,2")  # data, FSDP, FSDP x tensor, all three


def _run_sharded(corpus, cache, run_root, out, meshes):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(corpus), str(cache), str(run_root), str(out), *meshes],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(out).read_text())


def test_every_layout_on_8_devices_matches_1_device(small_corpus, tiny_cache_dir, tmp_path):
    single = train(
        tiny_config(
            small_corpus,
            tiny_cache_dir,
            tmp_path / "single",
            "train.steps=6",
            "train.eval_every=3",
            "checkpoint.every=3",
        )
    )
    results = _run_sharded(small_corpus, tiny_cache_dir, tmp_path, tmp_path / "o.json", MESHES)
    for mesh, sharded in results.items():
        assert sharded["sharded_dims"] > 0 or mesh == "8,1,1", mesh
        np.testing.assert_allclose(
            sharded["losses"], [r["loss"] for r in single.history], atol=1e-5, err_msg=mesh
        )
        np.testing.assert_allclose(
            sharded["grad_norms"], [r["grad_norm"] for r in single.history], rtol=1e-4
        )
        np.testing.assert_allclose(
            sharded["val"], [r["val_loss"] for r in single.evals], atol=1e-5, err_msg=mesh
        )

    # The checkpoint written on the (2, 2, 2) mesh restores onto this single device, and its
    # parameters match the single-device run's.
    cfg = tiny_config(small_corpus, tiny_cache_dir, tmp_path / "single", "train.steps=6")
    model = build_model(cfg.model)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.d_model)
    mesh1 = build_mesh(cfg.mesh)
    sh = state_shardings(model, tx, mesh1, cfg.data.seq_len)
    abstract = abstract_state(model, tx, cfg.data.seq_len)
    states = []
    for run in ("single", "2x2x2"):
        ckpt = Checkpointer(tmp_path / run)
        states.append(ckpt.restore(abstract, sh)[0])
        ckpt.close()
    for a, b in zip(
        jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-4)
