"""A BERT train step on a (2, 2, 2) mesh of 8 simulated devices equals the 1-device step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import bert_tiny_config

from flaxlm.train import train

WORKER = Path(__file__).parent / "bert_sharded_worker.py"


def test_bert_8_devices_match_1_device(small_corpus, tiny_cache_dir, tmp_path):
    single = train(
        bert_tiny_config(
            small_corpus,
            tiny_cache_dir,
            tmp_path / "single",
            "train.steps=4",
            "train.eval_every=4",
            "checkpoint.every=4",
        )  # fmt: skip
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "o.json"
    args = [str(small_corpus), str(tiny_cache_dir), str(tmp_path / "sharded"), str(out)]
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args, "2", "2", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(out.read_text())
    assert sharded["sharded_dims"] > 0
    for key in ("loss", "mlm_loss", "nsp_loss"):
        np.testing.assert_allclose(sharded[key], [r[key] for r in single.history], atol=1e-5)
    np.testing.assert_allclose(
        sharded["grad_norm"], [r["grad_norm"] for r in single.history], rtol=1e-4
    )
    np.testing.assert_allclose(sharded["val"], [r["val_loss"] for r in single.evals], atol=1e-5)
