"""A run killed at any moment — during an eval, right after a rollback (the record written,
nothing deleted yet), between checkpoints — and resumed each time makes exactly the decisions
of the uninterrupted run: the same rollback, the same skipped window, the same metrics.jsonl
line for line (timing fields aside), the same final weights."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config

from flaxlm.tools.load import load_checkpoint
from flaxlm.train.chaos import train_with_chaos
from flaxlm.train.evaluator import Evaluator
from flaxlm.train.reporter import StepReporter
from flaxlm.train.run_checkpoints import RunCheckpoints

RUN = (
    "train.steps=40",
    "train.eval_every=10",
    "checkpoint.every=5",
    "checkpoint.asynchronous=false",  # a kill in this process must not race a save thread
    "guard.warmup=5",
    "guard.known_good_after=5",
    "chaos.spike_at_steps=[23]",  # step 24's loss explodes: back to checkpoint 15
)
TIMING = ("tokens_per_s", "mfu", "goodput")


class Killed(BaseException):
    """Stands in for kill -9: nothing in flaxlm catches it."""


def kill_once(monkeypatch, cls, name, when):
    """Makes ``cls.name`` raise Killed the first time ``when(*args)`` holds."""
    original, fired = getattr(cls, name), []

    def wrapper(self, *args, **kwargs):
        if not fired and when(*args):
            fired.append(True)
            raise Killed(name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)


def metrics(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in lines]


def test_kills_anywhere_change_nothing(small_corpus, tiny_cache_dir, tmp_path, monkeypatch):
    straight = train_with_chaos(
        tiny_config(small_corpus, tiny_cache_dir, tmp_path / "straight", *RUN)
    )
    (event,) = straight.rollbacks
    assert (event["step"], event["restored_step"], event["skipped"]) == (24, 15, [15, 23])

    run_dir = tmp_path / "killed"
    cfg = tiny_config(small_corpus, tiny_cache_dir, run_dir, *RUN)
    kill_once(monkeypatch, Evaluator, "run", lambda params, step: step == 10)
    kill_once(monkeypatch, RunCheckpoints, "_restore_exactly", lambda step: step == 15)
    kill_once(monkeypatch, StepReporter, "step_done", lambda step, *rest: step == 32)
    attempts = 0
    while True:
        attempts += 1
        try:
            result = train_with_chaos(cfg)
            break
        except Killed:
            assert attempts < 5
    assert attempts == 4  # three kills, three resumes
    assert (run_dir / "rollback.json").is_file()
    assert json.loads((run_dir / "skip_ledger.json").read_text()) == [[15, 23]]
    assert metrics(run_dir) == metrics(tmp_path / "straight")
    a, b = load_checkpoint(run_dir), load_checkpoint(tmp_path / "straight")
    assert a.step == b.step == 40
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    assert result.step == 40


@pytest.mark.parametrize("keep", [None, 2])
def test_metrics_lines_after_the_checkpoint_are_dropped_on_resume(tmp_path, keep):
    from flaxlm.train.metrics_log import MetricsLog

    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0})
    log.close()
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 4, "lo')  # torn by a kill
    again = MetricsLog(tmp_path, resume_from_step=1, keep_lines=keep)
    assert again.lines == (keep if keep is not None else 1)
    again.close()
