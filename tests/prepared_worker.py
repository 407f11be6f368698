"""One process of the per-host-reads test (tests/test_data_prepared.py): joins the others
over 127.0.0.1, builds only its rows of each global batch from a prepared corpus, assembles the
global batch on the mesh and writes what it read.

    python tests/prepared_worker.py PORT N PROCESS_ID OUT CONFIG [overrides...]
"""

from __future__ import annotations

import json
import sys

import jax


def main() -> None:
    port, n, pid, out, config, *overrides = sys.argv[1:]
    n, pid = int(n), int(pid)
    jax.config.update("jax_num_cpu_devices", 1)
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid,
        initialization_timeout=60, heartbeat_timeout_seconds=10,
    )  # fmt: skip
    import numpy as np
    from jax.experimental import multihost_utils

    from flaxlm.config import load_config
    from flaxlm.data import prepare_data
    from flaxlm.data.batch_ramp import BatchRamp
    from flaxlm.families import family_of
    from flaxlm.parallel.sharding import build_mesh
    from flaxlm.train.batches import put_train_batch

    cfg = load_config(config, overrides)
    data = prepare_data(cfg.data, cfg.model.vocab_size, progress=False)
    batches = family_of(cfg).train_batches(data, cfg, BatchRamp.from_config(cfg.train))
    mesh = build_mesh(cfg.mesh)
    steps = [0, 1, 7, 1000]  # 1000: past the first epoch of the smaller source
    gathered = {}
    for step in steps:
        local = batches.batch(step, pid, n)
        global_batch = put_train_batch(local, mesh, 1)
        for key, value in global_batch.items():
            full = multihost_utils.process_allgather(value, tiled=True)
            gathered[f"{step}/{key}"] = np.asarray(full)[0]  # (1, B, S) -> (B, S)
    if pid == 0:
        np.savez(f"{out}/global.npz", **gathered)
    reads = {"tokens": data.train.tokens.reads.tokens, "steps": len(steps)}
    with open(f"{out}/reads-{pid}.json", "w") as f:
        json.dump(reads, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
