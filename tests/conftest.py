"""Shared fixtures: a small slice of the Shakespeare demo corpus and a tiny GPT config."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flaxlm.runtime.accelerators import accelerator_attached, prefer_cpu_without_accelerators

# Before any test imports jax: without an accelerator, run on the CPU and leave an installed
# libtpu unloaded (no warnings, no lock file; the TPU compile tests load it as a compiler).
# Importing flaxlm does the same; this says so where the tests start.
prefer_cpu_without_accelerators()

import flaxlm.families  # noqa: E402, F401  registers the families' config sections (objective)
from flaxlm.config import Config, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_PLAYS = ("hamlet", "macbeth", "othello", "the-tempest", "twelfth-night", "king-lear")


# Compiling a tiny model's init, train and eval steps takes ~15 CPU-seconds, and the same
# programs recur in almost every training test: in this process, in the other xdist worker and
# in the trainers the tests start as subprocesses. One XLA compilation cache for the session
# turns the repeats into cache hits. The executables are the ones XLA would compile again, so
# nothing a test asserts changes. Only compiles of 0.5 s or more are stored: persisting every
# tiny op of the eager-mode model tests cost more than it saved (35 vs 29 s, test_bert_model).
# The folder is named in the environment, which the xdist workers and the subprocesses
# inherit; the size bound turns on JAX's file lock, so processes sharing the folder never read
# a half-written entry. The first process makes and removes it.
XLA_CACHE = "FLAXLM_TEST_XLA_CACHE"
_made_xla_cache: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    import jax

    if XLA_CACHE not in os.environ:  # pytest itself, or the xdist controller
        os.environ[XLA_CACHE] = tempfile.mkdtemp(prefix="flaxlm-xla-cache-")
        _made_xla_cache.append(os.environ[XLA_CACHE])
    settings = {
        "jax_compilation_cache_dir": (os.environ[XLA_CACHE], str),
        "jax_persistent_cache_min_compile_time_secs": ("0.5", float),
        "jax_compilation_cache_max_size": (str(8 * 2**30), int),
    }
    for name, (value, kind) in settings.items():  # a JAX_... in the environment wins
        jax.config.update(name, kind(os.environ.setdefault(name.upper(), value)))


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in _made_xla_cache:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def unoptimized_compiles() -> Iterator[None]:
    """Compiles in the test skip XLA's backend optimizations (LLVM -O0, no expensive passes),
    without an accelerator. For tests whose cost is compiling, not running: test_remat.py's
    CPU gradients take 48 instead of 95 CPU-seconds; the TPU-target compiles gain only ~5 %,
    with byte-identical TPU memory figures (the four remat policies of test_tpu_compile.py).
    Not for tests that run many steps: unoptimized code runs slower (test_finetune.py's 3
    epochs: 40 -> 64 s). The HLO a test lowers and inspects is the same; the compilation cache
    keys on the setting. Subprocesses keep the default (see ``unoptimized_env``)."""
    import jax

    flag = "jax_disable_most_optimizations"
    before = bool(jax.config.values[flag])
    jax.config.update(flag, before or not accelerator_attached())
    yield
    jax.config.update(flag, before)


def unoptimized_env() -> dict[str, str]:
    """The environment that makes a subprocess compile as under ``unoptimized_compiles``: for
    short runs of trainers the tests start (6 steps of 2 processes: 82 -> 60 CPU-seconds)."""
    if accelerator_attached() or "JAX_DISABLE_MOST_OPTIMIZATIONS" in os.environ:
        return {}
    return {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


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


def bert_tiny_config(corpus: Path, cache_dir: Path, run_dir: Path, *overrides: str) -> Config:
    """``configs/bert_tiny.yaml`` (post-LN, MLM + NSP) on ``corpus``; same split as GPT's."""
    return load_config(
        REPO / "configs" / "bert_tiny.yaml",
        [
            f"data.paths=[{corpus}]",
            f"data.cache_dir={cache_dir}",
            "data.val_fraction=0.34",
            f"train.run_dir={run_dir}",
            *overrides,
        ],
    )


def noisy_params(model_cfg, seed: int = 0):
    """Random params of the config's model plus noise on every leaf (biases and norm scales
    too), so that conversion and parity tests see no constant-initialised tensor."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from flaxlm.families import build_model

    tokens_1x8 = jnp.zeros((1, 8), jnp.int32)
    params = nn.meta.unbox(build_model(model_cfg).init(jax.random.key(seed), tokens_1x8))
    leaves, tree = jax.tree.flatten(params["params"])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, noisy)


TRAINED_RUN_STEPS = 200


@pytest.fixture(scope="session")
def cli_trained_run(small_corpus, tiny_cache_dir, tmp_path_factory) -> tuple[Path, int, str]:
    """A finished tiny run trained as a user would, with ``flaxlm train CONFIG OVERRIDES``.

    Returns (run dir, exit code, stdout). 200 steps (a few seconds) take the model past the
    unigram baseline. Checkpoints every 50 steps, the last 3 kept: 100, 150, 200. Shared by
    the CLI and tools tests, which must not write into it.
    """
    from flaxlm.cli import main

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    argv = [
        "train",
        str(REPO / "configs" / "gpt_tiny.yaml"),
        f"data.paths=[{small_corpus}]",
        f"data.cache_dir={tiny_cache_dir}",
        "data.val_fraction=0.34",
        f"train.run_dir={run_dir}",
        f"train.steps={TRAINED_RUN_STEPS}",
        "train.eval_every=0",
        "checkpoint.every=50",
    ]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        code = main(argv)
    return run_dir, code, stdout.getvalue()


@pytest.fixture(scope="session")
def trained_run(cli_trained_run) -> Path:
    run_dir, code, _ = cli_trained_run
    assert code == 0, "flaxlm train failed; see test_cli.py::test_train_with_overrides"
    return run_dir
