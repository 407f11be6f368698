"""``flaxlm report``: plots and summary from a metrics.jsonl with a rollback in it."""

from __future__ import annotations

import json

from flaxlm.cli import main
from flaxlm.tools.report import read_run_metrics, write_report


def _metrics_with_a_rollback(run_dir):
    """Steps 1..30, a spike at 30 rolls back to 20, steps 21..40 trained again."""
    lines = []
    for step in range(1, 31):
        loss = 5.0 - 0.05 * step + (3.0 if step == 30 else 0.0)
        lines.append(
            {
                "step": step,
                "loss": loss,
                "accuracy": 0.1,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 1000.0 + step,
                "mfu": 0.2,
                "peak_flops": 150e9,
                "peak_origin": "measured:cpu:fp32",
            }
        )
        if step == 20:
            lines.append(
                {"step": 20, "val_loss": 4.2, "perplexity": 66.7, "accuracy": 0.2, "tokens": 4096}
            )
    lines.append(
        {
            "event": "rollback",
            "step": 30,
            "restored_step": 20,
            "skipped": [600, 959],
            "reason": "grad_norm 20.6 > mean 0.75 + 6 std",
        }
    )
    for step in range(21, 41):
        lines.append(
            {
                "step": step,
                "loss": 5.0 - 0.05 * step,
                "accuracy": 0.3,
                "lr": 1e-3,
                "grad_norm": 0.9,
                "tokens_per_s": 1100.0,
                "mfu": 0.2,
            }
        )
    lines.append({"step": 40, "val_loss": 3.5, "perplexity": 33.1, "accuracy": 0.3, "tokens": 4096})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "evals").mkdir()
    (run_dir / "evals" / "step_40.val.json").write_text(
        json.dumps(
            {"step": 40, "val_loss": 3.5, "perplexity": 33.1, "accuracy": 0.3, "tokens": 4096}
        )
    )


def test_metrics_are_sorted_out_around_a_rollback(tmp_path):
    _metrics_with_a_rollback(tmp_path)
    m = read_run_metrics(tmp_path / "metrics.jsonl")
    assert [s for s, _ in m.series["loss"]] == list(range(1, 41))  # one value per step
    assert dict(m.series["loss"])[30] == 5.0 - 0.05 * 30  # the retrained value wins
    assert sorted(s for s, _ in m.abandoned["loss"]) == list(range(21, 31))
    assert m.series["val_loss"] == [(20, 4.2), (40, 3.5)]
    # Evaluation lines keep their own keys: their accuracy does not clash with the train one.
    assert m.series["val_accuracy"] == [(20, 0.2), (40, 0.3)]
    assert sorted(s for s, _ in m.abandoned["accuracy"]) == list(range(21, 31))
    assert [(e["step"], e["restored_step"]) for e in m.rollbacks] == [(30, 20)]


def test_report_writes_plots_and_a_summary(tmp_path, capsys):
    run = tmp_path / "run"
    _metrics_with_a_rollback(run)
    assert main(["report", str(run)]) == 0
    out = run / "report"
    for name in ("overview", "loss", "lr", "grad_norm", "throughput"):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
    md = (out / "report.md").read_text()
    assert "rollbacks: 1" in md
    assert "MFU: median 20.0% of 0.15 TFLOP/s (`measured:cpu:fp32`)" in md  # the peak named
    assert "| 30 | 20 | 600..959 | grad_norm 20.6 > mean 0.75 + 6 std |" in md
    assert "best 3.5000 at step 40" in md
    assert "| step_40.val.json | 3.5000 | 33.10 |" in md
    assert "![overview](overview.png)" in md
    assert str(out / "report.md") in capsys.readouterr().out

    assert write_report(run, tmp_path / "elsewhere").parent == tmp_path / "elsewhere"
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_an_moe_run_gets_per_expert_load_and_aux_loss_plots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "grad_norm": 1.0, "moe_aux_loss": 0.02,
         "moe_load_max": 0.4, "moe_load_min": 0.1, "moe_load": [0.4, 0.3, 0.2, 0.1]}
        for s in range(1, 11)
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    metrics = read_run_metrics(run / "metrics.jsonl")
    assert [v for _, v in metrics.series["moe_load/2"]] == [0.2] * 10
    write_report(run)
    for name in ("moe_load", "moe_aux", "overview"):
        assert (run / "report" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
