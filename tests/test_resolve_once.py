"""Resolve once, pass it down: each command resolves the config's sources once, and a training
run builds one BatchRamp, which its batches, LR schedule and throughput meter all share."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, tiny_config

import flaxlm.data.inspection  # noqa: F401  (every module that may resolve sources is loaded,
import flaxlm.data.prepare  # noqa: F401     so the counter below reaches each of them)
import flaxlm.train.loop  # noqa: F401
from flaxlm.cli import main
from flaxlm.config import load_config
from flaxlm.data import prepare_data
from flaxlm.data import sources as sources_module
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.inspection import inspect_data
from flaxlm.families import family_of
from flaxlm.train import train


@pytest.fixture
def resolves(monkeypatch) -> list:
    """Each call of ``resolve_sources``, through whichever module imported it."""
    calls: list = []
    real = sources_module.resolve_sources

    def counted(data_cfg):
        calls.append(data_cfg)
        return real(data_cfg)

    for name, module in list(sys.modules.items()):
        if name.startswith("flaxlm") and getattr(module, "resolve_sources", None) is real:
            monkeypatch.setattr(module, "resolve_sources", counted)
    return calls


@pytest.fixture
def mixture(small_corpus, tmp_path) -> list[str]:
    """Overrides for two sources: the plays and a .jsonl of short notes."""
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": f"note {i} " * 30}) + "\n" for i in range(40)))
    return [
        f"data.sources=[{{path: {small_corpus}, weight: 3, name: plays}}, "
        f"{{path: {notes}, weight: 1, name: notes}}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.2",
    ]


def test_prepare_data_resolves_the_sources_once(mixture, resolves):
    cfg = load_config(REPO / "configs" / "gpt_tiny.yaml", mixture)
    built = prepare_data(cfg.data, cfg.model.vocab_size, progress=False)
    assert not built.cache_hit and len(resolves) == 1
    again = prepare_data(cfg.data, cfg.model.vocab_size, progress=False)
    assert again.cache_hit and len(resolves) == 2
    assert [s.name for s in again.sources] == ["plays", "notes"]


def test_data_inspect_resolves_once(mixture, resolves):
    cfg = load_config(REPO / "configs" / "gpt_tiny.yaml", mixture)
    report = inspect_data(cfg, family_of(cfg))
    assert [s["name"] for s in report["sources"]] == ["plays", "notes"]
    assert len(resolves) == 1


def test_data_prepare_command_resolves_once(mixture, resolves, tmp_path, capsys):
    out = tmp_path / "corpus"
    args = ["data", "prepare", str(REPO / "configs" / "gpt_tiny.yaml"), *mixture]
    assert main([*args, "--out", str(out), "--workers", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["units"] > 2  # several units, one resolve
    assert len(resolves) == 1


def test_a_training_run_resolves_once_and_builds_one_batch_ramp(
    small_corpus, tiny_cache_dir, tmp_path, resolves, monkeypatch
):
    ramps: list[BatchRamp] = []
    real_init = BatchRamp.__init__

    def counted(self, entries, full):
        real_init(self, entries, full)
        ramps.append(self)

    monkeypatch.setattr(BatchRamp, "__init__", counted)
    cfg = tiny_config(
        small_corpus, tiny_cache_dir, tmp_path / "run", "train.steps=3", "train.eval_every=0",
        "train.log_every=1", "train.batch_ramp=[[0, 4], [2, 8]]", "optim.schedule_unit=tokens",
    )  # fmt: skip
    result = train(cfg)
    assert result.step == 3 and [r["batch_size"] for r in result.history] == [4, 4, 8]
    assert len(resolves) == 1
    # Constant ramps of evaluation batches aside, one ramp: the run's.
    assert len([r for r in ramps if r.ramped]) == 1
