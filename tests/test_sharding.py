"""The same training run on 1 device and on 8 simulated devices gives the same numbers.

``check_layouts_match_1_device`` is shared with ``test_bert_sharded.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import bert_tiny_config, tiny_config, unoptimized_env

from flaxlm.checkpoint.manager import Checkpointer
from flaxlm.families import build_model
from flaxlm.parallel.sharding import build_mesh
from flaxlm.train import train
from flaxlm.train.optim import make_optimizer
from flaxlm.train.state import abstract_state, state_shardings

WORKER = Path(__file__).parent / "sharded_worker.py"
MESHES = ("8,1,1", "1,8,1", "1,4,2", "2,2,2")  # data, FSDP, FSDP x tensor, all three
CONFIGS = {"gpt": tiny_config, "bert": bert_tiny_config}


def _final_params(cfg, run_dir: Path):
    """The newest checkpoint in ``run_dir``, restored onto this process's one device."""
    model = build_model(cfg.model)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.d_model)
    shardings = state_shardings(model, tx, build_mesh(cfg.mesh), cfg.data.seq_len)
    ckpt = Checkpointer(run_dir)
    state, _ = ckpt.restore(abstract_state(model, tx, cfg.data.seq_len), shardings)
    ckpt.close()
    return jax.tree.map(np.asarray, state.params)


def check_layouts_match_1_device(
    family, corpus, cache, tmp_path, overrides, loss_keys=(), meshes=MESHES
):
    """Trains ``family`` on 1 device here and on each of ``meshes`` in one 8-device worker.

    Each mesh's losses (``loss`` and ``loss_keys``), grad norms and val losses must match the
    1-device run's, and so must its final parameters, restored from its checkpoint. A mesh may
    carry overrides of its own (``1,4,2:train.head_chunk=8``) that leave the math unchanged.
    """
    out = tmp_path / "o.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= unoptimized_env()  # compiles are the cost; the callers compile the 1-device run alike
    args = [family, str(corpus), str(cache), str(tmp_path), str(out), *meshes, *overrides]
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), *args], env=env, stderr=subprocess.PIPE, text=True
    )
    try:  # the 1-device run overlaps the worker's (mostly single-threaded) compiles
        single_cfg = CONFIGS[family](corpus, cache, tmp_path / "single", *overrides)
        single = train(single_cfg)
        _, stderr = worker.communicate(timeout=900)
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results) == list(meshes)

    def column(records, key):
        return [r[key] for r in records]

    want_params = _final_params(single_cfg, tmp_path / "single")
    for mesh, sharded in results.items():
        assert sharded["sharded"] > 0 or mesh.startswith("8,1,1"), mesh
        for key in ("loss", *loss_keys):
            np.testing.assert_allclose(
                column(sharded["history"], key),
                column(single.history, key),
                atol=1e-5,
                err_msg=f"{mesh} {key}",
            )
        np.testing.assert_allclose(
            column(sharded["history"], "grad_norm"),
            column(single.history, "grad_norm"),
            rtol=1e-4,
            err_msg=mesh,
        )
        np.testing.assert_allclose(
            column(sharded["evals"], "val_loss"),
            column(single.evals, "val_loss"),
            atol=1e-5,
            err_msg=mesh,
        )
        got_params = _final_params(single_cfg, Path(sharded["run_dir"]))
        for (path, want), got in zip(
            jax.tree_util.tree_leaves_with_path(want_params),
            jax.tree.leaves(got_params),
            strict=True,
        ):
            np.testing.assert_allclose(
                got, want, atol=5e-4, err_msg=f"{mesh} {jax.tree_util.keystr(path)}"
            )


# Together the meshes cover every axis: the plain logits on FSDP alone and on data x FSDP x
# tensor; the chunked head on FSDP x tensor (the vocabulary split), against the 1-device run
# with the plain logits (the same math: tests/test_head_loss.py). One worker trains all three.
# (Pure data parallelism is 2,2,2's data axis; tests/test_moe_sharded.py adds the expert axis.)
@pytest.mark.slow
@pytest.mark.usefixtures("unoptimized_compiles")
def test_gpt_on_every_layout_matches_1_device(small_corpus, tiny_cache_dir, tmp_path):
    overrides = ("train.steps=6", "train.eval_every=3", "checkpoint.every=3")
    meshes = ("1,8,1", "2,2,2", "1,4,2:train.head_chunk=8")
    check_layouts_match_1_device(
        "gpt", small_corpus, tiny_cache_dir, tmp_path, overrides, meshes=meshes
    )
