"""flaxlm's own task runner: tasks -> requests -> the scorer -> metrics.

    from flaxlm.tasks import run_tasks
    report = run_tasks(load_checkpoint("runs/gpt_demo"), ["shakespeare_next_line"], num_fewshot=5)
    report["tasks"]["shakespeare_next_line"]["acc"]

``TaskSuite`` loads and checks the tasks once (a task that does not load, or needs a request
type the family cannot run, fails at construction: before a training run's first step) and
runs them on any parameters, which is how training evaluates them every
``train.eval_tasks_every`` steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flaxlm.tasks.metrics import aggregate, doc_metrics
from flaxlm.tasks.prompts import Request, build_requests
from flaxlm.tasks.scorer import Scorer
from flaxlm.tasks.spec import TaskSpec, load_task

REQUEST_OF = {"multiple_choice": "loglikelihood"}  # output type -> request type


def run_requests(scorer: Scorer, requests: Sequence[Request]) -> list[Any]:
    """Each request's result, in order: ``(log p, greedy)``, a rolling ``log p``, or text."""
    out: list[Any] = [None] * len(requests)
    by_kind: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        by_kind.setdefault(r.kind, []).append(i)
    for kind, idx in by_kind.items():
        if kind == "loglikelihood":
            results = scorer.loglikelihood(
                [(requests[i].context, requests[i].continuation) for i in idx]
            )
        elif kind == "loglikelihood_rolling":
            results = scorer.loglikelihood_rolling([requests[i].continuation for i in idx])
        else:
            results = scorer.generate_until(
                [(requests[i].context, requests[i].until, requests[i].max_gen_toks) for i in idx]
            )
        for i, result in zip(idx, results, strict=True):
            out[i] = result
    return out


@dataclass
class TaskSuite:
    """Tasks loaded and checked against a family, ready to run on parameters."""

    specs: list[TaskSpec]
    num_fewshot: int | None = None
    limit: int | None = None

    @classmethod
    def load(
        cls,
        tasks: Sequence[str | Path],
        include_paths: Sequence[str | Path] | None = None,
        num_fewshot: int | None = None,
        limit: int | None = None,
    ) -> TaskSuite:
        specs = [load_task(t, list(include_paths or [])) for t in tasks]
        suite = cls(specs, num_fewshot, limit)
        for spec in specs:  # the prompts build now: a bad template fails here, not later
            build_requests(spec, num_fewshot, 1)
        return suite

    def check(self, scorer: Scorer) -> None:
        """One line for the first task the model's family cannot run."""
        for spec in self.specs:
            scorer.require(REQUEST_OF.get(spec.output_type, spec.output_type), spec.name)

    def run(self, scorer: Scorer, samples: bool = False) -> dict[str, dict[str, Any]]:
        """Task name -> ``{"num_fewshot", "docs", <metrics>}`` (and ``samples``: per request
        its doc, choice index and result, when asked)."""
        self.check(scorer)
        out = {}
        for spec in self.specs:
            k = spec.num_fewshot if self.num_fewshot is None else self.num_fewshot
            requests = build_requests(spec, k, self.limit)
            results = run_requests(scorer, requests)
            grouped: dict[int, list[Any]] = {}
            for r, res in zip(requests, results, strict=True):
                grouped.setdefault(r.doc, []).append(res)
            per_doc = [doc_metrics(spec, spec.docs[d], grouped[d]) for d in sorted(grouped)]
            out[spec.name] = {"num_fewshot": k, "docs": len(per_doc), **aggregate(spec, per_doc)}
            if samples:
                out[spec.name]["samples"] = [
                    {"doc": r.doc, "index": r.index, "result": res}
                    for r, res in zip(requests, results, strict=True)
                ]
        return out


def run_tasks(
    loaded: Any,
    tasks: Sequence[str | Path],
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 0,
    include_paths: Sequence[str | Path] | None = None,
    samples: bool = False,
) -> dict[str, Any]:
    """Runs ``tasks`` (names or YAML files) on a loaded checkpoint. Returns ``step``,
    ``tasks`` (per task its metrics, :meth:`TaskSuite.run`) and ``seconds``."""
    start = time.perf_counter()
    suite = TaskSuite.load(tasks, include_paths, num_fewshot, limit)
    scorer = Scorer(loaded, batch_size)
    results = suite.run(scorer, samples)
    return {"step": loaded.step, "tasks": results, "seconds": round(time.perf_counter() - start, 3)}


def task_scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``tasks/<name>/<metric>`` -> value: what a training run logs beside ``val_loss``."""
    return {
        f"tasks/{name}/{key}": float(value)
        for name, metrics in results.items()
        for key, value in metrics.items()
        if key not in ("num_fewshot", "docs", "samples") and not key.endswith("_stderr")
    }


def format_table(report: dict[str, Any]) -> list[str]:
    """The report as aligned rows: task, shots, docs, metric, value (± stderr)."""
    lines = [f"{'task':<28}{'shots':>6}{'docs':>7}  {'metric':<16}{'value':>10}"]
    for name, m in report["tasks"].items():
        for key, value in m.items():
            if key in ("num_fewshot", "docs", "samples") or key.endswith("_stderr"):
                continue
            err = m.get(f"{key}_stderr")
            tail = f" ± {err:.4f}" if err is not None else ""
            lines.append(
                f"{name:<28}{m['num_fewshot']:>6}{m['docs']:>7}  {key:<16}{value:>10.4f}{tail}"
            )
    return lines
