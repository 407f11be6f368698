"""configs/t5_tiny.yaml through every command, with progress output on, as a user runs them
(train, eval, plan, bench, data inspect, convert, generate), and a run killed mid-way and
resumed ending bit-identical to the uninterrupted one."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from conftest import REPO
from test_commands import cli

from flaxlm.tools.generate import GenerateOptions, generate
from flaxlm.tools.load import load_checkpoint
from flaxlm.train.reporter import StepReporter

STEPS = 8
TIMING = ("tokens_per_s", "mfu", "goodput")  # measured, not computed


def argv(corpus, cache, run_dir) -> list[str]:
    return [
        str(REPO / "configs" / "t5_tiny.yaml"),
        f"data.paths=[{corpus}]",
        f"data.cache_dir={cache}",
        "data.val_fraction=0.34",
        f"train.run_dir={run_dir}",
        f"train.steps={STEPS}",
        "train.eval_every=4",
        "checkpoint.every=4",
        "checkpoint.asynchronous=false",  # the killed run below must not race a save thread
        "train.progress=true",
    ]


@pytest.fixture(scope="module")
def trained(small_corpus, tiny_cache_dir, tmp_path_factory):
    """(argv, run dir, exit code, stdout, stderr) of a short t5_tiny run."""
    run_dir = tmp_path_factory.mktemp("t5") / "run"
    args = argv(small_corpus, tiny_cache_dir, run_dir)
    return (args, run_dir, *cli("train", *args))


def test_train_and_eval(trained):
    _, run_dir, code, out, err = trained
    assert code == 0, err
    assert "step 4: val_loss " in out and out.splitlines()[-1].startswith(f"done: step {STEPS}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    final = [r for r in records if "val_loss" in r][-1]
    code, out, err = cli("eval", run_dir, "--max-batches", 4, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert math.isclose(report["val_loss"], final["val_loss"], rel_tol=1e-5)
    # Target tokens only, against the unigram baseline of the same targets.
    assert 0 <= report["accuracy"] <= 1 and report["unigram_loss"] > 0
    code, text, err = cli("eval", run_dir, "--max-batches", 2)  # progress bar, printed report
    assert code == 0, err
    assert "unigram baseline" in text and "eval" in err


@pytest.mark.slow  # ~35 s on the busy 2-core slot: two decode programs compiled
def test_generate_greedy_and_beams(trained):
    """The CLI's completions are the API's (sampling: tests/test_t5_generate.py)."""
    _, run_dir, *_ = trained
    loaded = load_checkpoint(run_dir)
    prompt = ("generate", run_dir, "--prompt", "To be or not", "--max-new-tokens", 8,
              "--no-stop-at-eos")  # fmt: skip
    for extra, opts in (
        ((), GenerateOptions(8, stop_at_eos=False)),
        (("--num-beams", 3), GenerateOptions(8, num_beams=3, stop_at_eos=False)),
    ):
        code, out, err = cli(*prompt, "--json", *extra)
        assert code == 0, err
        completion = generate(loaded, "To be or not", opts)
        assert json.loads(out) == {"prompt": "To be or not", "completion": completion}
    code, text, err = cli(*prompt)  # the plain form: prompt + completion
    assert code == 0, err
    assert text == "To be or not" + generate(loaded, "To be or not", max_new_tokens=8,
                                             stop_at_eos=False) + "\n"  # fmt: skip


def test_plan_bench_inspect(trained):
    args, *_ = trained
    code, out, err = cli("plan", *args, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["params_bytes"] == 4 * report["n_params"] > 0
    code, out, err = cli("bench", *args, "--steps", 1, "--warmup", 0, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["tokens_per_s"] > 0
    code, out, err = cli("data", "inspect", *args, "--json")
    assert code == 0, err
    examples = json.loads(out)["sample"]["examples"]
    assert examples and all("<extra_id_0>" in e["input"] for e in examples)
    assert all(e["target"].startswith("<extra_id_0>") for e in examples)


def test_convert_to_hf(trained, tmp_path):
    pytest.importorskip("safetensors")
    _, run_dir, *_ = trained
    assert cli("convert", "to-hf", run_dir, tmp_path / "hf")[0] == 0
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["model_type"] == "t5"


class Killed(BaseException):
    """Stands in for kill -9: nothing in flaxlm catches it."""


def test_killed_and_resumed_is_bit_identical(trained, small_corpus, tiny_cache_dir, tmp_path,
                                             monkeypatch):  # fmt: skip
    """Killed after step 6 (checkpoint 4 on disk, steps 5-6 lost), resumed: the same
    metrics lines and bit-identical weights as the uninterrupted run."""
    _, straight, code, *_ = trained
    assert code == 0
    original, fired = StepReporter.step_done, []

    def step_done(self, step, *rest, **kw):
        if step == 6 and not fired:
            fired.append(step)
            raise Killed
        return original(self, step, *rest, **kw)

    monkeypatch.setattr(StepReporter, "step_done", step_done)
    run_dir = tmp_path / "killed"
    args = argv(small_corpus, tiny_cache_dir, run_dir)
    with pytest.raises(Killed):
        cli("train", *args)
    assert fired and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["4"]
    assert cli("train", *args)[0] == 0

    def lines(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIMING and "peak" not in k} for r in rows]

    assert lines(run_dir) == lines(straight)
    a, b = load_checkpoint(run_dir), load_checkpoint(straight)
    assert a.step == b.step == STEPS
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
