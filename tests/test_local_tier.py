"""The fast local checkpoint tier: ``checkpoint.local_every`` saves to ``checkpoint.local_dir``
only, ``checkpoint.every`` also to the run dir. A run killed between persistent saves loses at
most ``local_every`` steps; a host whose local disk was wiped resumes from the run dir and
says so in one line."""

from __future__ import annotations

import shutil

import pytest
from conftest import tiny_config

from flaxlm.checkpoint.manager import Checkpointer
from flaxlm.config import ConfigError
from flaxlm.train.chaos import train_with_chaos
from flaxlm.train.reporter import StepReporter

LOCAL_EVERY = 2
RUN = (
    "train.steps=16",
    "train.eval_every=0",
    "checkpoint.every=8",
    f"checkpoint.local_every={LOCAL_EVERY}",
    "checkpoint.asynchronous=false",  # the kill below is raised in this process
)


class Killed(BaseException):
    """Stands in for kill -9: nothing in flaxlm catches it."""


@pytest.mark.slow  # three short runs
def test_a_kill_loses_at_most_local_every_steps_and_a_wiped_disk_falls_back(
    small_corpus, tiny_cache_dir, tmp_path, monkeypatch, capsys
):
    run_dir, local = tmp_path / "run", tmp_path / "nvme"
    cfg = tiny_config(small_corpus, tiny_cache_dir, run_dir, *RUN, f"checkpoint.local_dir={local}")
    killed_at, original = 13, StepReporter.step_done

    def die(self, step, *args, **kwargs):
        if step == killed_at:
            raise Killed(f"step {step}")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(StepReporter, "step_done", die)
    with pytest.raises(Killed):
        train_with_chaos(cfg)
    monkeypatch.undo()
    tiers = Checkpointer(run_dir, local_dir=local, asynchronous=False)
    assert tiers.tier.steps() == [8]  # the run dir: every 8 steps
    assert tiers.local_steps()[-2:] == [10, 12]  # the local tier: every 2
    result = train_with_chaos(cfg, stop_at_step=14)
    assert result.resumed_from == 12  # from the local tier
    assert killed_at - result.resumed_from <= LOCAL_EVERY  # the work lost
    capsys.readouterr()
    shutil.rmtree(local)  # this host's local disk is wiped
    result = train_with_chaos(cfg)
    said = [line for line in capsys.readouterr().out.splitlines() if "local_dir" in line]
    assert said == [
        f"checkpoint.local_dir {local} holds no intact checkpoint of step 14 or later: "
        f"resuming from {run_dir / 'checkpoints'}"
    ]
    assert result.resumed_from == 14 and result.step == 16  # 14: the last save went to both


def test_local_every_needs_a_local_dir(small_corpus, tiny_cache_dir, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.local_every=2 needs checkpoint.local_dir"):
        tiny_config(small_corpus, tiny_cache_dir, tmp_path, "checkpoint.local_every=2")
