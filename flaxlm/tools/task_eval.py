"""``flaxlm eval --tasks``: benchmark tasks on a checkpoint, and where their report goes.

report = evaluate_tasks(load_checkpoint("runs/gpt_demo"), TaskSuite.load(["shakespeare_cloze"]))
save_report(report, "runs/gpt_demo", tasks_report_path(report, "runs/gpt_demo"))
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from flaxlm.tasks import Scorer, TaskSuite
from flaxlm.tools.load import LoadedModel, resolve_checkpoint


def evaluate_tasks(loaded: LoadedModel, suite: TaskSuite, batch_size: int = 0) -> dict[str, Any]:
    """``{"step", "tasks": {name: {"num_fewshot", "docs", <metrics>}}, "limit", "seconds"}``."""
    start = time.perf_counter()
    scorer = Scorer(loaded, batch_size)
    results = suite.run(scorer)
    return {
        "step": loaded.step,
        "tasks": results,
        "limit": suite.limit,
        "batch_size": scorer.batch_size,
        "seconds": round(time.perf_counter() - start, 3),
    }


def tasks_report_path(report: dict[str, Any], checkpoint: str | Path) -> Path:
    """``RUN_DIR/evals/step_<N>.tasks-<hash of the task names and shots>.json``."""
    run_dir, _ = resolve_checkpoint(checkpoint)
    key = ";".join(f"{name}:{m['num_fewshot']}" for name, m in sorted(report["tasks"].items()))
    digest = hashlib.sha256(f"{key};{report.get('limit')}".encode()).hexdigest()[:8]
    return run_dir / "evals" / f"step_{report['step']}.tasks-{digest}.json"
