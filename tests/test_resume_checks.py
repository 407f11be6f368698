"""A resume refuses what would change the run, naming the key and both values, unless
train.allow_config_change=true (then an event in metrics.jsonl); safe keys pass silently."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import yaml
from conftest import REPO, tiny_config

from flaxlm.cli import main
from flaxlm.config import load_config, to_dict
from flaxlm.train import train
from flaxlm.train.resume_checks import (
    FINGERPRINTS_FILE,
    ResumeRefused,
    config_changes,
    content_changes,
    refusal,
)


def _changes(*overrides: str) -> dict:
    return config_changes(to_dict(_cfg()), _cfg(*overrides))


def _cfg(*overrides: str):
    return load_config(None, ["data.paths=[a.txt]", *overrides], check_paths=False)


@pytest.mark.parametrize(
    "override",
    [
        "train.steps=5000", "train.eval_every=7", "train.log_every=3", "checkpoint.every=9",
        "checkpoint.keep=9", "train.progress=false", "train.watchdog_min_s=60", "mesh.fsdp=2",
        "guard.k_sigma=9", "chaos.nan_at_steps=[3]", "train.grad_accum=4", "model.remat=full",
        "data.cache_dir=/elsewhere", "train.distributed.num_processes=4",
        "train.allow_config_change=true", "train.run_dir=runs/copy",
    ],
)  # fmt: skip
def test_safe_keys_pass_silently(override):
    assert _changes(override) == {}


@pytest.mark.parametrize(
    "override, key, old, new",
    [
        ("train.batch_size=16", "train.batch_size", 32, 16),
        ("train.seed=1", "train.seed", 0, 1),
        ("data.seq_len=128", "data.seq_len", 256, 128),
        ("model.d_model=192", "model.d_model", 384, 192),
        ("model.family=bert", "model.family", "gpt", "bert"),
        ("objective.mlm=0.5", "objective.mlm", 1.0, 0.5),
        ("data.paths=[b.txt]", "data.paths", ["a.txt"], ["b.txt"]),
        ("data.tokenizer_vocab_size=100", "data.tokenizer_vocab_size", 8192, 100),
        ("optim.lr=1e-3", "optim.lr", 3e-4, 1e-3),
    ],
)
def test_what_would_change_the_run_is_named_with_both_values(override, key, old, new):
    assert _changes(override) == {key: (old, new)}


def test_decay_steps_may_pin_the_schedule_that_train_steps_stretches():
    saved = to_dict(_cfg("train.steps=300"))  # decay_steps 0: decays over 300 steps
    assert config_changes(saved, _cfg("train.steps=600")) == {}  # stretched: documented
    assert config_changes(saved, _cfg("train.steps=600", "optim.decay_steps=300")) == {}
    changed = config_changes(saved, _cfg("train.steps=600", "optim.decay_steps=450"))
    assert changed == {"optim.decay_steps": (0, 450)}


def test_keys_a_checkpoint_predates_count_as_their_defaults():
    saved = to_dict(_cfg())
    del saved["train"]["seed"], saved["objective"]
    assert config_changes(saved, _cfg()) == {}
    assert config_changes(saved, _cfg("train.seed=3")) == {"train.seed": (0, 3)}


def test_a_weights_only_checkpoint_fixes_only_the_model():
    imported = to_dict(load_config(None, ["model.d_model=128", "model.n_heads=4"]))  # no data
    wanted = {"model.d_model": (128, 384), "model.n_heads": (4, 6)}
    new = _cfg("model.d_model=128", "model.n_heads=4", "train.batch_size=8", "optim.lr=1e-2")
    assert config_changes(imported, new) == {}
    assert config_changes(imported, _cfg()) == wanted


def test_content_changes_and_the_one_line_refusal():
    assert content_changes({"data": "aa" * 32}, {"data": "aa" * 32}, True) == {}
    assert content_changes(None, {"data": "bb" * 32}, True) == {}  # nothing saved to compare
    changed = content_changes(
        {"web": "aa" * 32, "code": "c"}, {"web": "bb" * 32, "code": "c"}, False
    )
    assert changed == {"data.content.web": ("sha256:" + "a" * 12, "sha256:" + "b" * 12)}
    line = refusal(
        "runs/x", {"train.batch_size": (8, 16), "train.seed": (0, 1), "optim.lr": (1, 2)}
    )
    assert line == (
        "resuming runs/x would change train.batch_size from 8 (the checkpoint's) to 16 "
        "(and train.seed, optim.lr); set train.allow_config_change=true to accept"
    )


def _train_cli(corpus, cache_dir, run_dir, *overrides) -> tuple[int, str]:
    argv = [
        "train", str(REPO / "configs" / "gpt_tiny.yaml"), f"data.paths=[{corpus}]",
        f"data.cache_dir={cache_dir}", "data.val_fraction=0.34", f"train.run_dir={run_dir}",
        *overrides,
    ]  # fmt: skip
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def test_a_resume_that_would_change_the_run_is_refused_unless_allowed(
    small_corpus, tiny_cache_dir, tmp_path
):
    corpus, run_dir = tmp_path / "corpus", tmp_path / "run"
    shutil.copytree(small_corpus, corpus)
    args = (corpus, tiny_cache_dir, run_dir, "train.eval_every=0", "train.steps=6")
    train(tiny_config(*args), stop_at_step=4)  # a checkpoint at step 4 (no final eval)
    config_yaml = (run_dir / "config.yaml").read_bytes()
    tokenizer = (run_dir / "tokenizer.model").read_bytes()
    fingerprints = json.loads((run_dir / FINGERPRINTS_FILE).read_text())

    code, err = _train_cli(*args, "train.batch_size=16")
    assert code == 2
    assert err == (
        f"flaxlm train: error: resuming {run_dir} would change train.batch_size from 8 "
        "(the checkpoint's) to 16; set train.allow_config_change=true to accept\n"
    )
    assert (run_dir / "config.yaml").read_bytes() == config_yaml  # not overwritten

    # The same paths with other content: refused too (after tokenizing it with the
    # checkpoint's tokenizer, which also shows no new tokenizer is trained).
    play = sorted(corpus.iterdir())[0]
    play.write_text(play.read_text() + "\nEnter a new scene, never seen before.\n")
    with pytest.raises(ResumeRefused, match=r"would change data.content from sha256:\w{12} "):
        train(tiny_config(*args))
    assert json.loads((run_dir / FINGERPRINTS_FILE).read_text()) == fingerprints

    allowed = tiny_config(*args, "train.batch_size=16", "train.allow_config_change=true")
    result = train(allowed, stop_at_step=5)
    assert result.resumed_from == 4 and result.step == 5
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (event,) = [e for e in events if e.get("event") == "config_change"]
    assert event["step"] == 4 and event["changed"]["train.batch_size"] == [8, 16]
    assert list(event["changed"]) == ["train.batch_size", "data.content"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"] == 16
    assert (run_dir / "tokenizer.model").read_bytes() == tokenizer
    assert json.loads((run_dir / FINGERPRINTS_FILE).read_text()) != fingerprints
