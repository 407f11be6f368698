"""Agreement with lm-evaluation-harness (the ``eval`` extra; ``make install-dev`` installs it).

On the same checkpoint and task files: flaxlm's own runner and the harness running
``--model flaxlm`` give the same per-example log-likelihoods and metrics; and the harness's
reference HF model (``--model hf``) on the ``flaxlm convert to-hf`` export gives the same
per-example log-likelihoods within 1e-3 (fp32, CPU), and the same greedy generations: the
tokenisation of context/continuation boundaries, the few-shot prompts (seeded draws) and the
rolling windows are the harness's own. A tiny GPT with random weights; offline.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_tasks import V, gpt_run, loaded, tokenizer  # noqa: F401  (module fixtures)

from flaxlm.cli import main
from flaxlm.tasks import run_tasks
from flaxlm.tasks.scorer import rolling_windows

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra: pip install -e '.[eval]'")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TASKS = ["shakespeare_next_line", "shakespeare_next_word", "shakespeare_passages"]
SHOTS, LIMIT = 2, 4


@pytest.fixture(scope="module")
def ours(loaded):  # noqa: F811
    return run_tasks(loaded, TASKS, SHOTS, LIMIT, batch_size=8, samples=True)["tasks"]


def harness(model, **kw):
    from flaxlm.tools.lm_eval_model import task_manager

    return lm_eval.simple_evaluate(
        model=model, tasks=TASKS, num_fewshot=SHOTS, limit=LIMIT, log_samples=True,
        task_manager=task_manager(include_defaults=False), **kw,
    )  # fmt: skip


def harness_results(out, task) -> list:
    """Per request, in flaxlm's order (doc, then choice): the harness's filtered result."""
    flat = []
    for sample in sorted(out["samples"][task], key=lambda s: s["doc_id"]):
        resps = sample["filtered_resps"]
        flat += resps if isinstance(resps, list) else [resps]
    return flat


def same_text(a: str, b: str) -> bool:
    """Equal, up to how a run of byte tokens that is not valid UTF-8 is shown: sentencepiece
    replaces only the bad bytes with U+FFFD, HF's ByteFallback decoder the whole run (a random
    model emits such runs), so U+FFFD on either side stands for one character."""
    bad = "\ufffd"
    return len(a) == len(b) and all(x == y or bad in (x, y) for x, y in zip(a, b, strict=True))


def assert_same(ours_task, theirs, tol):
    mine = [s["result"] for s in ours_task["samples"]]
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs, strict=True):
        if isinstance(a, str):  # a greedy generation
            assert same_text(a, b), (a, b)
        elif isinstance(a, tuple):  # (log-likelihood, is greedy)
            assert abs(a[0] - float(b[0])) <= tol and a[1] == bool(b[1])
        else:  # a rolling log-likelihood
            assert abs(a - float(b)) <= tol


def test_the_harness_running_flaxlm_agrees_with_flaxlms_runner(loaded, ours):  # noqa: F811
    from flaxlm.tools.lm_eval_model import FlaxLM

    out = harness(FlaxLM(loaded=loaded, batch_size=8))
    for task in TASKS:
        assert_same(ours[task], harness_results(out, task), 1e-4)
        for key, value in out["results"][task].items():
            metric = key.split(",")[0]
            if metric in ours[task] and not isinstance(value, str):
                assert ours[task][metric] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_the_harness_hf_model_on_the_export_agrees(gpt_run, ours, tmp_path):  # noqa: F811
    pytest.importorskip("accelerate", reason="lm_eval's hf model needs accelerate")
    pytest.importorskip("transformers", reason="the hf extra")
    assert main(["convert", "to-hf", str(gpt_run), str(tmp_path / "hf")]) == 0
    args = f"pretrained={tmp_path / 'hf'},dtype=float32"
    out = harness("hf", model_args=args, device="cpu", batch_size=8)
    for task in TASKS:
        assert_same(ours[task], harness_results(out, task), 1e-3)


def test_rolling_windows_are_the_harness_windows():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(3, 140))
    for max_length in (1, 7, 48, 136, 137, 300):
        theirs = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(tokens, 1, max_length, context_len=1)
        ]
        assert rolling_windows(tokens, 1, max_length) == [tuple(w) for w in theirs]


@pytest.mark.slow  # the harness indexes its own ~10k task files first
def test_flaxlm_lm_eval_is_the_harness_command_line(gpt_run, ours, tmp_path, capsys):  # noqa: F811
    args = ["--model", "flaxlm", "--model_args", f"run_dir={gpt_run},step=3",
            "--tasks", "shakespeare_next_line", "--num_fewshot", str(SHOTS),
            "--limit", str(LIMIT), "--batch_size", "8", "--output_path", str(tmp_path)]  # fmt: skip
    rc = main(["lm-eval", *args])
    assert rc == 0
    assert "shakespeare_next_line" in capsys.readouterr().out  # the harness's table
    written = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    acc = written["results"]["shakespeare_next_line"]["acc,none"]
    assert acc == pytest.approx(ours["shakespeare_next_line"]["acc"])
    assert np.isfinite(acc)
