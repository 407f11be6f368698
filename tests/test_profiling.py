"""Profiler traces: ``train.profile_steps: [start, stop]`` leaves a ``*.xplane.pb`` under
RUN_DIR/profile/ that JAX's own XSpace reader (the format of TensorBoard's profile plugin and
XProf) opens, with the train steps, the data waits, the evaluation and the checkpoint save
as named annotations; ``flaxlm bench --profile DIR`` traces its timed steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, tiny_config

from flaxlm.cli import main
from flaxlm.config import ConfigError, load_config
from flaxlm.train import train
from flaxlm.train.profiling import StepProfiler, annotation_names, trace_files


@pytest.mark.parametrize(
    "value, message",
    [
        ("[5, 5]", "train.profile_steps=[5, 5] must be [start, stop] with 1 <= start < stop"),
        ("[0, 3]", "train.profile_steps=[0, 3] must be [start, stop] with 1 <= start < stop"),
        ("[4]", "train.profile_steps=[4] must be [start, stop] with 1 <= start < stop"),
    ],
)
def test_a_bad_window_is_one_line_naming_it(value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(REPO / "configs/gpt_tiny.yaml", [f"train.profile_steps={value}"])


def test_profile_hosts_choose_the_processes_that_trace(tmp_path):
    cfg = load_config(REPO / "configs/gpt_tiny.yaml", ["train.profile_steps=[2, 4]"])
    trace_dir = str(tmp_path / "profile")
    assert StepProfiler.for_run(cfg, tmp_path, 3).log_dir == trace_dir  # every host
    cfg.train.profile_hosts = [0, 2]
    assert StepProfiler.for_run(cfg, tmp_path, 0).log_dir == trace_dir
    assert StepProfiler.for_run(cfg, tmp_path, 1).log_dir is None
    cfg.train.profile_steps = []
    assert StepProfiler.for_run(cfg, tmp_path, 0).log_dir is None


def _step_numbers(xplane: Path) -> set[int]:
    from jax.profiler import ProfileData

    found = set()
    for plane in ProfileData.from_file(str(xplane)).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name == "train":
                    found |= {int(v) for k, v in event.stats if k == "step_num"}
    return found


def test_a_cpu_run_leaves_a_trace_of_its_steps_that_the_profile_tools_read(
    small_corpus, tiny_cache_dir, tmp_path
):
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        small_corpus, tiny_cache_dir, run_dir, "train.steps=8", "train.profile_steps=[3, 5]",
        "train.eval_every=4", "checkpoint.every=4",
    )  # fmt: skip
    train(cfg)
    (trace,) = trace_files(run_dir / "profile")
    assert trace.name.endswith(".xplane.pb") and trace.parent.parent.name == "profile"
    names = annotation_names(trace)
    assert names["train"] >= 3 and names["data"] >= 3
    assert names["eval"] == 1 and names["checkpoint"] == 1  # step 4's
    assert {3, 4, 5} <= _step_numbers(trace) <= {3, 4, 5, 6}  # 6 reads step 5's metrics
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == list(range(1, 9))  # the run goes on


def test_bench_traces_its_timed_steps(tmp_path, capsys, monkeypatch):
    from flaxlm.tools import bench

    monkeypatch.setattr(bench, "measure_peak", lambda *a, **k: 1e9)  # no probes: not timed
    out = tmp_path / "trace"
    argv = ["bench", str(REPO / "configs/gpt_tiny.yaml"), "--steps", "3", "--warmup", "1"]
    assert main([*argv, "--profile", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["profile"] == str(out)
    (trace,) = trace_files(out)
    assert _step_numbers(trace) == {3, 4, 5}  # compile is 1, the warm-up 2


def test_a_run_that_raises_still_ends_its_trace(
    small_corpus, tiny_cache_dir, tmp_path, monkeypatch
):
    """A run that fails mid-trace (here: its first evaluation) writes its trace and leaves the
    profiler free: the next trace in the same process starts (jax refuses a second
    start_trace while one is running)."""
    import jax

    from flaxlm.train import evaluator

    def failing_eval(self, params, step):
        raise RuntimeError(f"evaluation failed at step {step}")

    monkeypatch.setattr(evaluator.Evaluator, "run", failing_eval)
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        small_corpus, tiny_cache_dir, run_dir, "train.steps=6", "train.profile_steps=[1, 5]",
        "train.eval_every=3", "checkpoint.every=6",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="evaluation failed at step 3"):
        train(cfg)
    assert len(trace_files(run_dir / "profile")) == 1  # written when the trace stopped
    jax.profiler.start_trace(str(tmp_path / "again"))
    jax.profiler.stop_trace()
