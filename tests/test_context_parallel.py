"""Context parallelism (flaxlm/models/context_parallel.py): the sequence split over
``mesh.context``. The load-balanced order gives every shard the same causal work; a run on
8 simulated devices with context 2 or 4 equals the 1-device run (losses, gradients, final
parameters) on packed rows with RoPE; splash under the context axis equals the dense
reference; the mesh checks know the axis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import unoptimized_env

from flaxlm.config import ConfigError, load_config
from flaxlm.models.context_parallel import load_balanced_order
from flaxlm.parallel.sharding import resolve_mesh_shape
from flaxlm.tools import targets
from flaxlm.tools.plan import plan

REPO = Path(__file__).resolve().parents[1]

WORKER = Path(__file__).parent / "context_worker.py"


def run_worker(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out.json"
    # A few steps per mesh: compiling is the cost, so the worker compiles unoptimized.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | unoptimized_env()
    worker = subprocess.run(
        [sys.executable, str(WORKER), args[0], str(out), *args[1:]],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("shards", [2, 4])
def test_load_balanced_order_gives_each_shard_equal_causal_work(shards):
    length = 8 * shards
    order = load_balanced_order(length, shards)
    assert sorted(order.tolist()) == list(range(length))  # a permutation
    chunk = length // (2 * shards)
    per_shard = order.reshape(shards, -1)
    for s, rows in enumerate(per_shard):  # chunks s and 2n-1-s
        assert rows[:chunk].tolist() == list(range(s * chunk, (s + 1) * chunk))
        last = 2 * shards - 1 - s
        assert rows[chunk:].tolist() == list(range(last * chunk, (last + 1) * chunk))
    # visible (query, key) pairs of a causal mask, per shard: query at original index i sees i+1
    work = [int(np.sum(rows + 1)) for rows in per_shard]
    assert len(set(work)) == 1, work
    contiguous = [int(np.sum(rows + 1)) for rows in np.arange(length).reshape(shards, -1)]
    assert contiguous[-1] > contiguous[0]  # what the reordering avoids


def test_the_mesh_checks_know_the_context_axis():
    cfg = load_config(None, ["mesh.data=2", "mesh.context=-1"])
    assert resolve_mesh_shape(cfg.mesh, 8) == (2, 1, 1, 4, 1)
    with pytest.raises(ConfigError, match="context=3"):
        resolve_mesh_shape(load_config(None, ["mesh.data=1", "mesh.context=3"]).mesh, 8)
    with pytest.raises(ConfigError, match=r"mesh.context=0 must be a positive size"):
        load_config(None, ["mesh.context=0"])
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        load_config(None, ["mesh.data=-1", "mesh.context=-1"])


def test_context_splash_equals_dense_attention_and_decode_is_refused(tmp_path):
    result = run_worker(tmp_path, "attention")
    assert max(result["errors"]) < 1e-5, result["errors"]  # out, dq, dk, dv
    assert "mesh.context=2" in result["decode"] and "\n" not in result["decode"]


@pytest.mark.slow
def test_context_2_and_4_train_as_one_device(tmp_path):
    result = run_worker(tmp_path, "train", "4,2", "2,4")
    single = result.pop("1")
    for mesh, run in result.items():
        np.testing.assert_allclose(run["losses"], single["losses"], rtol=1e-6, err_msg=mesh)
        for got, want in zip(run["grads"], single["grads"], strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=mesh)
        for got, want in zip(run["params"], single["params"], strict=True):
            np.testing.assert_allclose(got, want, atol=5e-4, err_msg=mesh)


@pytest.mark.slow
def test_bert_under_context_2_and_4_equals_one_device(tmp_path):
    """Bidirectional attention keeps the rows in their order; the MLM head's gather of masked
    positions and the NSP head's first token read across the context shards."""
    result = run_worker(tmp_path, "bert", "4,2", "2,4")
    single = result.pop("1")
    for mesh, run in result.items():
        np.testing.assert_allclose(run["loss"], single["loss"], rtol=1e-6, err_msg=mesh)
        for got, want in zip(run["out"] + run["grads"], single["out"] + single["grads"],
                             strict=True):  # fmt: skip
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=mesh)


@pytest.mark.skipif(not targets.libtpu_installed(), reason="needs libtpu: pip install -e '.[tpu]'")
@pytest.mark.usefixtures("unoptimized_compiles")
def test_splash_compiles_under_the_context_axis_for_v5e_2x2():
    overrides = [
        "data.seq_len=512", "model.max_seq_len=512", "model.d_model=128", "model.n_heads=2",
        "model.n_kv_heads=1", "model.n_layers=1", "model.attention_impl=auto",
        "train.batch_size=2", "mesh.data=1", "mesh.fsdp=2", "mesh.context=2",
    ]  # fmt: skip
    cfg = load_config(REPO / "configs/llama_tiny.yaml", overrides, False)
    report = plan(cfg, "v5e:2x2")
    assert report["mesh"]["context"] == 2
    assert report["mosaic_kernels"] > 0  # splash inside the context shard_map
