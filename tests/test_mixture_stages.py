"""Mixture stages (``data.stages``) in a tiny run: the weights change at a step, each source's
loss is logged while it is drawn, and a run stopped at the boundary resumes bit for bit."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config

from flaxlm.tools.load import load_checkpoint
from flaxlm.train import train

TRAGEDIES = ("hamlet", "macbeth", "othello", "king-lear")


def two_sources(corpus, root):
    """The small corpus as two sources: tragedies and comedies."""
    for name in ("tragedy", "comedy"):
        (root / name).mkdir(parents=True)
    for path in corpus.iterdir():
        shutil.copy(path, root / ("tragedy" if path.stem in TRAGEDIES else "comedy") / path.name)
    return (
        f"data.sources=[{{path: {root / 'tragedy'}, name: tragedy}}, "
        f"{{path: {root / 'comedy'}, name: comedy}}]"
    )


def records(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "goodput")} for r in lines
    ]


@pytest.mark.slow
def test_a_staged_mixture_logs_each_source_and_resumes_at_the_boundary_exactly(
    small_corpus, tiny_cache_dir, tmp_path
):
    run = (
        "data.paths=[]",
        two_sources(small_corpus, tmp_path / "corpus"),
        "data.stages=[{step: 6, weights: {comedy: 1}}]",  # an annealing stage: comedy only
        "train.steps=12",
        "train.eval_every=0",
        "checkpoint.every=4",
        "checkpoint.asynchronous=false",
    )
    straight = tmp_path / "straight"
    train(tiny_config(small_corpus, tiny_cache_dir, straight, *run))
    steps = [r for r in records(straight) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    # Before the boundary both sources are drawn (half each); after it, comedy alone.
    for r in steps[:6]:
        assert {"loss/tragedy", "loss/comedy"} <= set(r), r
    for r in steps[6:]:
        assert "loss/comedy" in r and "loss/tragedy" not in r, r
        assert r["loss/comedy"] == pytest.approx(r["loss"], rel=1e-6)

    stopped = tmp_path / "stopped"
    cfg = tiny_config(small_corpus, tiny_cache_dir, stopped, *run)
    assert train(cfg, stop_at_step=6).step == 6  # the last step of the first stage
    assert train(cfg).step == 12
    assert records(stopped) == records(straight)
    a, b = load_checkpoint(stopped), load_checkpoint(straight)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
