"""Shared fixtures: a small slice of the Shakespeare demo corpus and a tiny GPT config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flaxlm.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
TINY_PLAYS = ("hamlet", "macbeth", "othello", "the-tempest", "twelfth-night", "king-lear")


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory) -> Path:
    """All 38 plays as text files (documents = plays)."""
    from flaxlm.data.demo import write_shakespeare

    out = tmp_path_factory.mktemp("shakespeare")
    write_shakespeare(out)
    return out


@pytest.fixture(scope="session")
def small_corpus(shakespeare_dir, tmp_path_factory) -> Path:
    """Six plays: enough text to learn from, small enough to tokenize in a blink."""
    out = tmp_path_factory.mktemp("small_corpus")
    for path in sorted(shakespeare_dir.rglob("*.txt")):
        if path.stem in TINY_PLAYS:
            shutil.copy(path, out / path.name)
    assert len(list(out.iterdir())) == len(TINY_PLAYS)
    return out


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_config(corpus: Path, cache_dir: Path, run_dir: Path, *overrides: str) -> Config:
    return load_config(
        REPO / "configs" / "gpt_tiny.yaml",
        [
            f"data.paths=[{corpus}]",
            f"data.cache_dir={cache_dir}",
            "data.val_fraction=0.34",
            f"train.run_dir={run_dir}",
            *overrides,
        ],
    )


TRAINED_RUN_STEPS = 200


@pytest.fixture(scope="session")
def trained_run(small_corpus, tiny_cache_dir, tmp_path_factory) -> Path:
    """A finished tiny run, shared read-only by the tools and CLI tests.

    200 steps (a few seconds) take the model past the unigram baseline, so greedy decoding
    emits more than one distinct token. Checkpoints every 50 steps, the last 3 kept: 100, 150,
    200. Tests must not write into it.
    """
    from flaxlm.train import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    cfg = tiny_config(
        small_corpus,
        tiny_cache_dir,
        run_dir,
        f"train.steps={TRAINED_RUN_STEPS}",
        "train.eval_every=0",
        "checkpoint.every=50",
    )
    result = train(cfg)
    assert result.step == TRAINED_RUN_STEPS
    return run_dir
