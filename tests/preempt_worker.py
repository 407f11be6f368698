"""One process of a multi-process tiny GPT run, for test_multihost_preemption.py.

FLAXLM_COORDINATOR=... FLAXLM_NUM_PROCESSES=2 FLAXLM_PROCESS_ID=i FLAXLM_LOCAL_DEVICES=2 \\
    python tests/preempt_worker.py CORPUS CACHE RUN_DIR STEPS

Trains until STEPS or a SIGTERM to any of the processes, then prints one JSON line: this
process's index, the step it stopped at, and why it stopped early (null if it did not).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

from flaxlm.runtime.distributed import initialize  # noqa: E402
from flaxlm.train import train  # noqa: E402


def main() -> None:
    corpus, cache, run_dir, steps = sys.argv[1:]
    cfg = tiny_config(
        Path(corpus), Path(cache), Path(run_dir), f"train.steps={steps}",
        "train.eval_every=0", "checkpoint.every=1000",
    )  # fmt: skip
    initialize(cfg.train.distributed)
    result = train(cfg)
    line = {"process": result.process_index, "step": result.step, "preempted": result.preempted}
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
