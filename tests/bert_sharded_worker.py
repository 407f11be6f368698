"""Run by tests/test_bert_sharded.py in a fresh process with 8 simulated CPU devices.

python tests/bert_sharded_worker.py CORPUS CACHE RUN_DIR OUT_JSON data fsdp tensor [overrides]
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from conftest import bert_tiny_config  # noqa: E402
from sharded_worker import check_param_shardings  # noqa: E402

from flaxlm.train import train  # noqa: E402


def main() -> None:
    corpus, cache, run_dir, out, data, fsdp, tensor, *extra = sys.argv[1:]
    cfg = bert_tiny_config(
        Path(corpus), Path(cache), Path(run_dir), "train.steps=4", "train.eval_every=4",
        "checkpoint.every=4", f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
        *extra,
    )  # fmt: skip
    assert jax.device_count() == 8
    n_sharded = check_param_shardings(cfg)
    result = train(cfg)
    keys = ("loss", "mlm_loss", "nsp_loss", "grad_norm")
    Path(out).write_text(
        json.dumps(
            {
                **{k: [r[k] for r in result.history] for k in keys},
                "val": [r["val_loss"] for r in result.evals],
                "sharded_dims": n_sharded,
            }
        )
    )


if __name__ == "__main__":
    main()
