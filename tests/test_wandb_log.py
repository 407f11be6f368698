"""Weights & Biases logging: what reaches the run (against metrics.jsonl), steps that only go
up across rollbacks and restarts, one run per run dir, failures that never stop training, and
a real offline run read back from its ``.wandb`` file."""

from __future__ import annotations

import json
import struct
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, tiny_config

from flaxlm.cli import main
from flaxlm.config import load_config, to_dict
from flaxlm.train.metrics_log import MetricsLog, read_metrics
from flaxlm.train.wandb_log import STATE_FILE, WandbLog


class FakeRun:
    """Records what the logger asks of a W&B run."""

    def __init__(self, fail_on_log: int | None = None, **kwargs):
        self.kwargs, self.fail_on_log = kwargs, fail_on_log
        self.logged: list[tuple[int, dict]] = []
        self.config: dict = {}
        self.metrics: list[tuple] = []
        self.alerts: list[dict] = []
        self.summary: dict = {}
        self.exit_code: int | None = None
        self.step = 0

    def log(self, data, step):
        if self.fail_on_log is not None and len(self.logged) == self.fail_on_log:
            raise ConnectionError("the service went away\nsecond line")
        self.logged.append((step, data))

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def alert(self, title, text, level):
        self.alerts.append({"title": title, "text": text, "level": level})

    def finish(self, exit_code=0):
        self.exit_code = exit_code


class FakeWandb:
    """A stand-in for the ``wandb`` module: ``init`` makes a FakeRun."""

    def __init__(self, fail_on_log: int | None = None, fail_init: bool = False):
        self.runs: list[FakeRun] = []
        self.fail_on_log, self.fail_init = fail_on_log, fail_init

    def init(self, **kwargs):
        if self.fail_init:
            raise RuntimeError("api key not configured (no-tty)")
        run = FakeRun(self.fail_on_log, **kwargs)
        run.config = SimpleNamespace(update=lambda d, allow_val_change: run.__dict__.update(c=d))
        self.runs.append(run)
        return run

    @staticmethod
    def Table(columns, data):  # noqa: N802 - the wandb name
        return {"columns": columns, "data": [list(row) for row in data]}


def _cfg(run_dir: Path, *overrides: str):
    return load_config(
        REPO / "configs" / "gpt_tiny.yaml",
        [f"train.run_dir={run_dir}", "logging.wandb=true", *overrides],
        check_paths=False,
    )


def _train_record(step: int, loss: float) -> dict:
    return {
        "step": step,
        "loss": loss,
        "lr": 1e-3 * step,
        "grad_norm": 0.5,
        "moe_load": [0.25, 0.75],
    }


def test_records_reach_wandb_and_its_steps_only_go_up_over_a_rollback(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run_dir = tmp_path / "my_run"
    cfg = _cfg(run_dir, "logging.wandb_tags=[ablation]")
    fake = FakeWandb()
    log = MetricsLog(run_dir, wandb=WandbLog(cfg, fake))
    for step in (1, 2, 3, 4):
        log.write(_train_record(step, 5.0 - step / 10))
    log.write({"step": 4, "val_loss": 4.5, "perplexity": 90.0})
    rollback = {"event": "rollback", "step": 4, "restored_step": 2, "skipped": [2, 3]}
    log.write({**rollback, "reason": "loss 9.0 > 5.1"})
    for step in (3, 4):  # the replay after the rollback: steps W&B has seen already
        log.write({**_train_record(step, 4.0 - step / 10), "mfu": float("nan")})
    log.close(summary={"step": 4, "preempted": ""})

    (run,) = fake.runs
    assert run.kwargs["id"] == json.loads((run_dir / STATE_FILE).read_text())["id"]
    assert run.kwargs["resume"] == "allow" and run.kwargs["name"] == "my_run"
    assert run.kwargs["project"] == "flaxlm" and run.kwargs["tags"] == ["ablation"]
    assert run.kwargs["mode"] == "offline" and run.kwargs["dir"] == str(run_dir)
    assert run.c == to_dict(cfg)  # the resolved config
    assert ("*", "train/step") in run.metrics  # the charts' x-axis is the training step

    # One W&B record per metrics.jsonl line, at W&B steps 0, 1, 2, ...: the replayed steps 3
    # and 4 are kept, not dropped as repeats.
    lines = read_metrics(run_dir / "metrics.jsonl")
    assert [s for s, _ in run.logged] == list(range(len(lines)))
    assert [d["train/step"] for _, d in run.logged] == [r["step"] for r in lines]
    train = [(d["train/step"], d["train/loss"]) for _, d in run.logged if "train/loss" in d]
    assert train == [(r["step"], r["loss"]) for r in lines if "loss" in r]
    first = run.logged[0][1]
    assert first["train/moe_load/0"] == 0.25 and first["train/moe_load/1"] == 0.75
    assert "train/mfu" not in run.logged[-1][1]  # non-finite (null in metrics.jsonl): left out
    assert run.logged[4][1] == {"eval/val_loss": 4.5, "eval/perplexity": 90.0, "train/step": 4}
    table = run.logged[5][1]["events"]
    assert table["columns"] == ["step", "event", "details"]
    assert table["data"][0][:2] == [4, "rollback"]
    assert json.loads(table["data"][0][2])["restored_step"] == 2
    assert run.alerts == [
        {"title": "rollback at step 4", "text": "loss 9.0 > 5.1", "level": "WARN"}
    ]
    assert run.summary == {"rollbacks": 1, "step": 4, "preempted": ""}
    assert run.exit_code == 0


def test_a_restart_continues_the_same_run_after_its_last_step(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")  # the environment's mode wins: not passed
    run_dir = tmp_path / "run"
    cfg, fake = _cfg(run_dir), FakeWandb()
    log = MetricsLog(run_dir, wandb=WandbLog(cfg, fake))
    for step in (1, 2, 3):
        log.write(_train_record(step, 3.0))
    log.write({"event": "config_change", "step": 3, "changed": {"train.steps": [3, 9]}})
    log.write(_train_record(4, 3.0))
    # Killed without closing; the checkpoint it resumes from held the first 4 lines, so step
    # 4 is replayed, and the kept event is again the first row of the events table.
    again = MetricsLog(run_dir, resume_from_step=3, keep_lines=4, wandb=WandbLog(cfg, fake))
    again.write(_train_record(4, 2.5))
    again.write({"event": "rollback", "step": 4, "restored_step": 3, "skipped": [3, 3]})
    again.close()

    first, second = fake.runs
    assert "mode" not in first.kwargs
    assert second.kwargs["id"] == first.kwargs["id"]
    assert [s for s, _ in first.logged] == [0, 1, 2, 3, 4]
    assert [s for s, _ in second.logged] == [5, 6]  # after the first attempt's, no repeats
    assert second.logged[0][1]["train/loss"] == 2.5
    rows = second.logged[1][1]["events"]["data"]
    assert [row[1] for row in rows] == ["config_change", "rollback"]
    assert second.summary["rollbacks"] == 1
    assert json.loads((run_dir / STATE_FILE).read_text())["next_step"] == 7


def test_a_wandb_failure_is_one_warning_and_training_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    fake = FakeWandb(fail_on_log=2)
    log = MetricsLog(run_dir, wandb=WandbLog(_cfg(run_dir), fake))
    with pytest.warns(UserWarning) as caught:
        for step in range(1, 6):
            log.write(_train_record(step, 3.0))
        log.close()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "ConnectionError: the service went away" in message and "\n" not in message
    assert len(fake.runs[0].logged) == 2 and fake.runs[0].exit_code == 1
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 5  # metrics.jsonl has them all

    # No login / no network at start: the same, and nothing is logged.
    broken = FakeWandb(fail_init=True)
    with pytest.warns(UserWarning, match="W&B start failed .*api key not configured"):
        log = MetricsLog(tmp_path / "other", wandb=WandbLog(_cfg(tmp_path / "other"), broken))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log.write(_train_record(1, 3.0))
        log.close()


def test_without_wandb_installed_train_fails_at_once_naming_the_extra(
    tmp_path, monkeypatch, capsys, small_corpus
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    argv = [str(REPO / "configs" / "gpt_tiny.yaml"), f"data.paths=[{small_corpus}]"]
    argv += [f"data.cache_dir={cache}", f"train.run_dir={run_dir}", "logging.wandb=true"]
    code = main(["train", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "pip install 'flaxlm[wandb]'" in err, err
    assert not cache.exists() and not (run_dir / "config.yaml").exists()  # before the data


def test_only_process_0_logs(tmp_path):
    pytest.importorskip("wandb")
    assert WandbLog.for_run(_cfg(tmp_path), is_main=False) is None
    assert isinstance(WandbLog.for_run(_cfg(tmp_path), is_main=True), WandbLog)
    assert WandbLog.for_run(_cfg(tmp_path, "logging.wandb=false"), is_main=True) is None


# --- a real offline run, read back from the .wandb files -------------------------------------


def _wandb_records(path: Path):
    """The records of a ``.wandb`` file: LevelDB-style log blocks of 32 KiB after a 7-byte
    ``:W&B`` header, each record a chunk header (crc32, length, type) + a protobuf Record,
    split FIRST / MIDDLE / LAST across blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", buf[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, parts = 7, b""
    while pos + 7 <= len(buf):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        if left < 7 or kind == 0:  # block padding
            pos += left
            continue
        data, pos = buf[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = data if kind in (1, 2) else parts + data
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def _history(record) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item}  # fmt: skip


def test_offline_run_holds_the_losses_and_a_restart_continues_it(
    small_corpus, tiny_cache_dir, tmp_path, monkeypatch
):
    """A tiny run with a rollback (NaN at step 7 -> back to step 4), stopped at step 9 and
    resumed to 12: one W&B run id in two offline folders whose history is metrics.jsonl (the
    NaN loss, null there, is left out)."""
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data")):  # fmt: skip
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # default: RUN_DIR/wandb
    from flaxlm.train.chaos import train_with_chaos as train  # chaos.* faults: the harness

    run_dir = tmp_path / "run"
    overrides = (
        "train.steps=12", "train.eval_every=0", "checkpoint.every=2", "guard.warmup=2",
        "guard.known_good_after=2", "chaos.nan_at_steps=[7]", "logging.wandb=true",
    )  # fmt: skip
    first = train(tiny_config(small_corpus, tiny_cache_dir, run_dir, *overrides), stop_at_step=9)
    second = train(tiny_config(small_corpus, tiny_cache_dir, run_dir, *overrides))
    assert [e["restored_step"] for e in first.rollbacks] == [4] and second.step == 12

    run_id = json.loads((run_dir / STATE_FILE).read_text())["id"]
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    attempts = [list(_wandb_records(f / f"run-{run_id}.wandb")) for f in folders]
    histories = [[_history(r) for r in recs if r.HasField("history")] for recs in attempts]
    order = sorted(range(2), key=lambda i: histories[i][0]["_step"])  # the first attempt first
    rows = histories[order[0]] + histories[order[1]]
    w_steps = [h["_step"] for h in rows]
    assert w_steps == sorted(set(w_steps))  # only upward, across the rollback and restart

    lines = read_metrics(run_dir / "metrics.jsonl")
    train_lines = [(r["step"], r["loss"]) for r in lines if "loss" in r]
    assert [s for s, _ in train_lines] == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10, 11, 12]
    assert train_lines.pop(6) == (7, None)
    assert [(h["train/step"], h["train/loss"]) for h in rows if "train/loss" in h] == train_lines
    evals = [(h["train/step"], h["eval/val_loss"]) for h in rows if "eval/val_loss" in h]
    assert evals == [(r["step"], r["val_loss"]) for r in lines if "val_loss" in r] != []
    (table,) = [h for h in rows if h.get("events/_type") == "table-file"]  # the rollback's
    assert table["train/step"] == 7
    table_file = folders[order[0]] / "files" / table["events/path"]
    (row,) = json.loads(table_file.read_text())["data"]
    assert row[:2] == [7, "rollback"] and json.loads(row[2])["restored_step"] == 4

    run_records = [r.run for recs in attempts for r in recs if r.HasField("run")]
    assert {r.run_id for r in run_records} == {run_id}
    assert all(r.display_name == "run" for r in run_records)
    updates = [r.config for recs in attempts for r in recs if r.HasField("config")]
    config = {i.key: json.loads(i.value_json) for u in updates for i in u.update}
    assert config["train"]["steps"] == 12 and config["logging"]["wandb"] is True
    summary = {}  # the second attempt's final summary
    for r in attempts[order[1]]:
        if r.HasField("summary"):
            summary.update({i.key: json.loads(i.value_json) for i in r.summary.update})
    assert summary["step"] == 12 and summary["rollbacks"] == 1 and summary["preempted"] == ""
