"""metrics.jsonl: plain JSON lines, crash-tolerant reading, resume without duplicates, plots."""

from __future__ import annotations

import json
import struct

import numpy as np
from tensorboardX.proto.event_pb2 import Event

from flaxlm.train.metrics_log import MetricsLog, plot_loss, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_lines_are_plain_json_with_numpy_values_converted(tmp_path):
    log = MetricsLog(tmp_path / "run")
    log.write(
        {
            "step": np.int64(3),
            "loss": np.float32(2.5),
            "finite": np.bool_(True),
            "hist": np.arange(3, dtype=np.int32),
            "note": "warmup",
        }
    )
    log.write({"step": 4, "loss": 2.25})
    log.close()

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first == {"step": 3, "loss": 2.5, "finite": True, "hist": [0, 1, 2], "note": "warmup"}
    assert type(first["step"]) is int and type(first["loss"]) is float
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[1]["step"] == 4
    # Scalars also go to TensorBoard.
    assert list((tmp_path / "run" / "tensorboard").iterdir())


def _tensorboard_events(folder) -> list[Event]:
    """Every event in a TensorBoard folder (TFRecord framing: length, crc, data, crc)."""
    events = []
    for path in sorted(folder.iterdir()):
        raw = path.read_bytes()
        at = 0
        while at < len(raw):
            (n,) = struct.unpack("<Q", raw[at : at + 8])
            events.append(Event.FromString(raw[at + 12 : at + 12 + n]))
            at += 12 + n + 4
    return events


def test_rollback_events_are_text_entries_in_tensorboard(tmp_path):
    log = MetricsLog(tmp_path / "run")
    log.write({"step": 5, "loss": 3.0})
    event = {"event": "rollback", "step": 7, "restored_step": 4, "skipped": [4, 6], "reason": "x"}
    log.write(event)
    log.close()
    values = [
        (e.step, v.tag, v)
        for e in _tensorboard_events(tmp_path / "run" / "tensorboard")
        for v in e.summary.value
    ]
    assert [(s, t) for s, t, _ in values if t == "loss"] == [(5, "loss")]
    (text,) = [v for s, t, v in values if t.startswith("events/rollback") and s == 7]
    assert json.loads(text.tensor.string_val[0].decode()) == event
    # The event's numbers are not plotted as if they were metrics.
    assert not [t for _, t, _ in values if t in ("restored_step", "skipped")]


def test_a_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]


def test_resume_drops_the_lines_after_the_checkpoint_step(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 7):
        log.write({"step": step, "loss": 10.0 - step})
    log.write({"step": 4, "val_loss": 5.5})
    log.close()
    # The crash also tore the last line.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')

    # Resumed from the step-4 checkpoint: steps 5 and 6 will be replayed.
    log = MetricsLog(tmp_path, resume_from_step=4)
    log.write({"step": 5, "loss": 4.75})
    log.close()

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records == [
        {"step": 1, "loss": 9.0},
        {"step": 2, "loss": 8.0},
        {"step": 3, "loss": 7.0},
        {"step": 4, "loss": 6.0},
        {"step": 4, "val_loss": 5.5},
        {"step": 5, "loss": 4.75},
    ]
    # Every line parses: the torn one did not swallow the first line written after resuming.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(records)
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_non_main_processes_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    log = MetricsLog(run_dir, enabled=False)
    log.write({"step": 1, "loss": 1.0})
    assert log.plot() is None
    log.close()
    assert not run_dir.exists()

    # Nor does a disabled logger touch the main process's file when resuming.
    main = MetricsLog(run_dir)
    main.write({"step": 1, "loss": 1.0})
    main.write({"step": 2, "loss": 0.5})
    main.close()
    before = (run_dir / "metrics.jsonl").read_bytes()
    other = MetricsLog(run_dir, enabled=False, resume_from_step=1)
    other.write({"step": 2, "loss": 9.0})
    other.close()
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_plot_writes_a_png(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 11):
        log.write({"step": step, "loss": 5.0 / step})
    log.write({"step": 10, "val_loss": 0.7})
    out = log.plot()
    log.close()
    assert out == tmp_path / "loss.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000
    assert not list(tmp_path.glob("*.tmp.png"))


def test_plot_returns_none_when_there_is_nothing_to_plot(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    assert plot_loss(metrics, tmp_path / "loss.png") is None
    metrics.write_text('{"step": 1, "tokens_per_s": 100.0}\n')
    assert plot_loss(metrics, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
    # Validation points alone are enough.
    metrics.write_text('{"step": 5, "val_loss": 3.0}\n{"step": 10, "val_loss": 2.0}\n')
    assert plot_loss(metrics, tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC


def test_a_list_metric_is_one_tensorboard_scalar_per_entry(tmp_path):
    log = MetricsLog(tmp_path / "run")
    log.write({"step": 3, "moe_load": [0.5, 0.25, 0.25], "moe_load_max": 0.5})
    log.close()
    tags = {
        v.tag: v.simple_value
        for e in _tensorboard_events(tmp_path / "run" / "tensorboard")
        for v in e.summary.value
    }
    assert tags == {"moe_load/0": 0.5, "moe_load/1": 0.25, "moe_load/2": 0.25, "moe_load_max": 0.5}
