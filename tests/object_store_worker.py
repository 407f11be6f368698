"""One process of a multi-process tiny GPT run whose run dir is in a bucket, for
test_object_store_multihost.py. Every process has its own local folder (``process-<i>`` of
``checkpoint.local_dir``), as pod hosts have their own disks.

FLAXLM_COORDINATOR=... FLAXLM_NUM_PROCESSES=2 FLAXLM_PROCESS_ID=i FLAXLM_LOCAL_DEVICES=2 \\
    python tests/object_store_worker.py CORPUS CACHE RUN_DIR LOCAL_DIR KILL_AT [key=value ...]

Trains; with KILL_AT > 0 every process ends itself with os._exit right after step KILL_AT
(a kill -9 of the whole job: no cleanup, no final save). Prints one JSON line at the end:
where it resumed from and the sum of |x| over each parameter of the last step (in
``jax.tree.leaves`` order), computed on the devices by all processes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import tiny_config  # noqa: E402

from flaxlm.runtime.distributed import initialize  # noqa: E402
from flaxlm.train import train  # noqa: E402
from flaxlm.train.run_checkpoints import RunCheckpoints  # noqa: E402


def main() -> None:
    corpus, cache, run_dir, local_dir, kill_at, *overrides = sys.argv[1:]
    cfg = tiny_config(
        Path(corpus), Path(cache), run_dir, f"checkpoint.local_dir={local_dir}", *overrides
    )
    initialize(cfg.train.distributed)
    due = RunCheckpoints.due

    def killed_after(self, step, last_step):
        if step == int(kill_at):
            os._exit(9)
        return due(self, step, last_step)

    save, sums = RunCheckpoints.save, []

    def save_and_sum(self, state, step, *args, **kwargs):
        if step == cfg.train.steps:  # every process computes the global sums together
            sums[:] = [float(jnp.abs(x).sum()) for x in jax.tree.leaves(state.params)]
        return save(self, state, step, *args, **kwargs)

    RunCheckpoints.due, RunCheckpoints.save = killed_after, save_and_sum
    result = train(cfg)
    line = {"process": result.process_index, "resumed_from": result.resumed_from, "sums": sums}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
