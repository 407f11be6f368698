"""Task evaluation: lm-evaluation-harness tasks (few-shot benchmarks) on flaxlm models.

    from flaxlm.tasks import run_tasks
    run_tasks(load_checkpoint("runs/gpt_demo"), ["shakespeare_next_line"], num_fewshot=5)

spec.py reads task YAML (the harness's format, local data); prompts.py builds the harness's
requests and few-shot prompts; scorer.py (and generation.py) score them with the model, the
one path flaxlm's runner (runner.py) and the harness adapter (harness.py, ``flaxlm lm-eval``)
share; metrics.py turns results into the harness's metrics. ``builtin/`` holds the shipped
tasks. Imports lm_eval only in harness.py (the ``eval`` extra).
"""

from flaxlm.tasks.runner import TaskSuite, format_table, run_requests, run_tasks, task_scalars
from flaxlm.tasks.scorer import Scorer
from flaxlm.tasks.spec import TaskError, TaskSpec, builtin_tasks, load_task

__all__ = [
    "Scorer",
    "TaskError",
    "TaskSpec",
    "TaskSuite",
    "builtin_tasks",
    "format_table",
    "load_task",
    "run_requests",
    "run_tasks",
    "task_scalars",
]
