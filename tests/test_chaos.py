"""Fault injection lives outside the production step (flaxlm/train/chaos.py): the jitted train
step is the same program whether or not the config schedules ``chaos.*`` faults, and
``flaxlm train`` refuses such a config in one line instead of ignoring it."""

from __future__ import annotations

import jax
import numpy as np
from conftest import REPO
from flax import linen as nn

from flaxlm.cli import main
from flaxlm.config import load_config
from flaxlm.families import family_of
from flaxlm.parallel.sharding import LOGICAL_RULES
from flaxlm.train.program import TrainProgram
from flaxlm.train.step import step_controls

FAULTS = ("chaos.nan_at_steps=[3,7]", "chaos.spike_at_steps=[5]", "chaos.hang_at_steps=[9]")


def step_jaxpr(*overrides: str) -> str:
    """The production train step's jaxpr on abstract inputs (nothing runs or compiles)."""
    cfg = load_config(REPO / "configs/gpt_tiny.yaml", list(overrides), check_paths=False)
    family = family_of(cfg)
    ms = TrainProgram.build(cfg, family)
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype),
        family.synthetic_batch(cfg, np.random.default_rng(0)),
    )
    controls = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), step_controls())
    with jax.set_mesh(ms.mesh), nn.logical_axis_rules(LOGICAL_RULES):
        return str(jax.make_jaxpr(ms.train_step.jitted)(ms.abstract, batch, controls))


def test_the_production_step_is_the_same_with_chaos_faults_configured():
    assert step_jaxpr(*FAULTS) == step_jaxpr()


def test_flaxlm_train_refuses_chaos_faults(small_corpus, tmp_path, capsys):
    argv = [
        "train", str(REPO / "configs/gpt_tiny.yaml"), f"data.paths=[{small_corpus}]",
        f"train.run_dir={tmp_path / 'run'}", "chaos.nan_at_steps=[3]",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chaos.nan_at_steps=[3]" in err, err
    assert "python -m flaxlm.train.chaos" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work


def test_the_chaos_harness_runs_flaxlm_train_with_its_faults(
    small_corpus, tiny_cache_dir, tmp_path, capsys
):
    from flaxlm.train import chaos

    argv = [
        str(REPO / "configs/gpt_tiny.yaml"), f"data.paths=[{small_corpus}]",
        f"data.cache_dir={tiny_cache_dir}", "data.val_fraction=0.34",
        f"train.run_dir={tmp_path / 'run'}", "train.steps=10", "train.eval_every=0",
        "checkpoint.every=4", "guard.known_good_after=2", "chaos.nan_at_steps=[7]",
    ]  # fmt: skip
    assert chaos.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"1 rollback(s); skipped data windows in {tmp_path / 'run'}/skip_ledger.json" in out
    assert out[-1].startswith("done: step 10, val_loss "), out
