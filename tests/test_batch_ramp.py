"""Batch-size ramp-up (``train.batch_ramp``): the rows of each data position, the config
checks, the LR schedule in tokens, and a tiny run with a ramp that rolls back across the ramp's
boundary and resumes from a stop mid-ramp bit for bit."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import bert_tiny_config, tiny_config
from test_data_causal import make_split

from flaxlm.config import ConfigError, OptimConfig, load_config
from flaxlm.data import BATCH_KEYS, CausalBatches
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.train.optim import make_schedule


def reference_rows(entries: list[list[int]], full: int, position: int) -> list[int]:
    """Plain Python: walk the positions, adding up each one's batch size."""

    def size(d: int) -> int:
        return [b for s, b in entries if s <= d][-1] if entries else full

    first = sum(size(d) for d in range(position))
    return list(range(first, first + size(position)))


@pytest.mark.parametrize(
    "entries", [[], [[0, 2], [3, 4], [10, 8]], [[0, 8]], [[0, 4], [1, 2], [7, 8]]]
)
def test_offsets_match_a_running_sum_of_batch_sizes(entries):
    ramp = BatchRamp(entries, 8)
    for d in range(40):
        rows = reference_rows(entries, 8, d)
        assert ramp.offset(d) == rows[0] and ramp.size(d) == len(rows)
        assert ramp.global_rows(d).tolist() == rows
        assert float(ramp.full_batches(d)) == pytest.approx(rows[0] / 8)
        assert float(ramp.full_batches(jnp.int32(d), jnp)) == pytest.approx(rows[0] / 8)
    assert ramp.ramped == (len(entries) > 1)


def test_batches_refuse_a_ramp_of_another_full_batch():
    """The run's ramp is handed down, not rebuilt: batches of another size would not be the
    rows its LR schedule and throughput meter count."""
    split = make_split([50] * 40, unique=True)
    with pytest.raises(ValueError, match="batch ramp ends at 8 rows but global_batch=4"):
        CausalBatches(split, seq_len=8, global_batch=4, seed=0, ramp=BatchRamp([[0, 2], [3, 8]], 8))
    assert CausalBatches(split, seq_len=8, global_batch=4, seed=0).ramp.full == 4


def test_ramped_batches_are_consecutive_rows_of_the_constant_batch_order():
    split = make_split([50] * 40, unique=True)
    ramp = BatchRamp([[0, 2], [3, 4], [5, 8]], 8)
    ramped = CausalBatches(split, seq_len=8, global_batch=8, seed=4, ramp=ramp)
    one_row = CausalBatches(split, seq_len=8, global_batch=1, seed=4)  # row r = batch r
    plain = CausalBatches(split, seq_len=8, global_batch=8, seed=4)
    for d in (0, 2, 3, 4, 5, 9, 60):  # 60: past the first epoch
        got = ramped.batch(d)
        rows = reference_rows([[0, 2], [3, 4], [5, 8]], 8, d)
        for key in BATCH_KEYS:
            want = np.concatenate([one_row.batch(r)[key] for r in rows])
            assert np.array_equal(got[key], want), (d, key)
        # Two processes each build half, in process order.
        halves = [ramped.batch(d, p, 2)["inputs"] for p in (0, 1)]
        assert np.array_equal(np.concatenate(halves), got["inputs"])
        # No ramp: exactly the rows every existing run trains on, step * B + row.
        ids = plain.example_ids(d * 8 + np.arange(8))
        assert np.array_equal(plain.batch(d)["inputs"], ((ids * 8)[:, None] + np.arange(8)))


@pytest.mark.parametrize(
    "ramp, message",
    [
        ("[[1, 4], [5, 8]]", "train.batch_ramp[0]=[1, 4] should be a pair"),
        ("[[0, 4], [0, 8]]", "train.batch_ramp[1]=[0, 8] should be a pair"),
        ("[[0, 4, 2], [5, 8]]", "train.batch_ramp[0]=[0, 4, 2] should be a pair"),
        ("[[0, 3], [5, 8]]", "train.batch_ramp[0]=[0, 3]: the batch size must be in [1, "),
        ("[[0, 4], [5, 16]]", "train.batch_ramp[1]=[5, 16]: the batch size must be in [1, "),
        ("[[0, 4], [5, 6]]", "train.batch_ramp[1]=[5, 6]: the last batch size must be"),
    ],
)
def test_bad_ramps_are_one_line_errors_naming_the_entry(ramp, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.batch_size=8", "train.grad_accum=2", f"train.batch_ramp={ramp}"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_ramp_size_the_mesh_cannot_split_is_refused_naming_it():
    from types import SimpleNamespace

    from flaxlm.train.batches import check_train_batches_fit

    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 2, "expert": 1, "tensor": 1})  # 4 shards
    cfg = load_config(None, ["train.batch_size=8", "train.batch_ramp=[[0, 4], [3, 8]]"])
    check_train_batches_fit(cfg.train, mesh)
    cfg = load_config(None, ["train.batch_size=8", "train.batch_ramp=[[0, 2], [3, 8]]"])
    with pytest.raises(ConfigError) as err:
        check_train_batches_fit(cfg.train, mesh)
    assert str(err.value).startswith("micro-batch train.batch_ramp[0]=[0, 2]: batch size/")
    assert "not divisible by the 4 batch shards" in str(err.value)


def test_a_resume_with_another_ramp_stages_or_schedule_unit_is_a_change_of_the_run():
    from flaxlm.config import to_dict
    from flaxlm.train.resume_checks import config_changes

    run = ["train.batch_size=8", "data.sources=[README.md, pyproject.toml]"]
    saved = to_dict(load_config(None, run))
    for override, key in [
        ("train.batch_ramp=[[0, 4], [10, 8]]", "train.batch_ramp"),
        ("data.stages=[{step: 5, weights: {README: 1}}]", "data.stages"),
        ("optim.schedule_unit=tokens", "optim.schedule_unit"),
    ]:
        assert list(config_changes(saved, load_config(None, [*run, override]))) == [key]
    for section, key in (("train", "batch_ramp"), ("data", "stages")):
        saved[section].pop(key)  # a checkpoint from before ramps and stages: no change
    assert config_changes(saved, load_config(None, run)) == {}


def test_lr_schedule_in_tokens_follows_the_rows_trained():
    cfg = OptimConfig(lr=1.0, schedule="linear", warmup_steps=4, min_lr_ratio=0.0)
    ramp = BatchRamp([[0, 2], [8, 8]], 8)  # 8 quarter batches, then full ones
    steps = make_schedule(cfg, 20, 64, ramp)
    by_tokens = dataclasses.replace(cfg, schedule_unit="tokens")
    tokens = make_schedule(by_tokens, 20, 64, ramp)
    assert float(steps(4)) == pytest.approx(1.0)  # warm after 4 steps
    assert float(tokens(4)) == pytest.approx(0.25)  # only one full batch of tokens so far
    # 2 + 8 = 10 full batches before step 16, on a decay from 4 to 14 full batches (the run's
    # 20 steps hold 2 + 12 of them).
    assert float(tokens(16)) == pytest.approx(1 - 6 / 10)
    assert float(tokens(19)) == pytest.approx((14 - 13) / (14 - 4))
    assert float(tokens(20)) == pytest.approx(0.0, abs=1e-6)
    no_ramp = make_schedule(by_tokens, 20, 64, BatchRamp.constant(8))
    assert [float(no_ramp(s)) for s in range(20)] == [float(steps(s)) for s in range(20)]


def test_bert_batches_follow_the_ramp(small_corpus, tiny_cache_dir, tmp_path):
    from flaxlm.data import prepare_data
    from flaxlm.data.masked_batches import make_masked_batches
    from flaxlm.families import family_of

    cfg = bert_tiny_config(
        small_corpus, tiny_cache_dir, tmp_path, "train.batch_ramp=[[0, 2], [2, 8]]",
        "train.batch_size=8",
    )  # fmt: skip
    data = prepare_data(cfg.data, cfg.model.vocab_size, progress=False)
    ramped = family_of(cfg).train_batches(data, cfg, BatchRamp.from_config(cfg.train))
    plain = make_masked_batches(data.train, cfg, data.tokenizer, 8)
    assert len(ramped.batch(1)["inputs"]) == 2 and len(ramped.batch(2)["inputs"]) == 8
    # Positions 0, 1 (2 rows each) then 2 (8 rows): global rows 0..3, then 4..11.
    want = plain.build(np.arange(4, 12))
    for key, value in ramped.batch(2).items():
        assert np.array_equal(value, want[key]), key


RUN = (
    "train.steps=18",
    "train.batch_ramp=[[0, 4], [12, 8]]",
    "train.eval_every=0",
    "checkpoint.every=5",
    "checkpoint.asynchronous=false",
    "guard.warmup=5",
    "guard.known_good_after=5",
    "chaos.spike_at_steps=[11]",  # step 12's loss explodes: back to checkpoint 5
    "optim.schedule_unit=tokens",
)


def lines(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "goodput")} for r in rows
    ]


def test_a_ramped_run_rolls_back_and_resumes_mid_ramp_bit_for_bit(
    small_corpus, tiny_cache_dir, tmp_path, caplog
):
    from flaxlm.tools.load import load_checkpoint
    from flaxlm.train.chaos import train_with_chaos as train  # chaos.* faults: the harness

    with jax.log_compiles(True), caplog.at_level("WARNING"):
        straight = train(tiny_config(small_corpus, tiny_cache_dir, tmp_path / "straight", *RUN))
    # One compiled train step per batch size, the rollback's restored state included.
    compiled = [r for r in caplog.messages if r.startswith("Compiling jit(train_step)")]
    assert len(compiled) == 2, compiled
    (event,) = straight.rollbacks
    # Step 12 trained data position 11 (a 4-row batch); checkpoint 5 is the newest known
    # good; positions 5..11 are skipped, so step 6 on trains positions 12.. of 8 rows.
    assert (event["step"], event["restored_step"], event["skipped"]) == (12, 5, [5, 11])
    records = [r for r in lines(tmp_path / "straight") if "loss" in r]
    assert [r["batch_size"] for r in records[:12]] == [4] * 12  # positions 0..11
    final = {r["step"]: r["batch_size"] for r in records}  # the last record of each step
    assert [final[s] for s in range(1, 19)] == [4] * 5 + [8] * 13

    stopped = tmp_path / "stopped"
    cfg = tiny_config(small_corpus, tiny_cache_dir, stopped, *RUN)
    assert train(cfg, stop_at_step=4).step == 4  # mid-ramp, between checkpoints
    assert train(cfg).step == 18
    assert lines(stopped) == lines(tmp_path / "straight")
    a, b = load_checkpoint(stopped), load_checkpoint(tmp_path / "straight")
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
