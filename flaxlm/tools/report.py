"""``flaxlm report RUN_DIR``: plots and a short Markdown summary from ``metrics.jsonl``.

Writes ``RUN_DIR/report/`` (or ``--out``): ``loss.png`` (train and validation), ``lr.png``,
``grad_norm.png``, ``throughput.png`` (tokens/s), for MoE runs ``moe_load.png`` (each
expert's share of the routed tokens) and ``moe_aux.png`` (the router's auxiliary loss),
``overview.png`` (all of them), ``goodput.png`` and ``report.md`` with a goodput table
(flaxlm/tools/report_goodput.py). Rollback events (``{"event": "rollback",
"step", "restored_step", "skipped", "reason"}`` lines) are drawn on every plot: a red line at
the step where the spike was seen and a shaded span back to the step restored. Steps trained
again after a rollback replace the abandoned ones; the abandoned values are drawn faint, so
the damage stays visible.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flaxlm import storage
from flaxlm.tools.report_goodput import goodput_table, plot_goodput
from flaxlm.train.metrics_log import read_metrics

PANELS = {  # file stem -> (title, [(metric key, label)], y label, log scale)
    "loss": ("loss", [("loss", "train"), ("val_loss", "validation")], "nats/token", False),
    "lr": ("learning rate", [("lr", "lr")], "lr", False),
    "grad_norm": ("gradient norm", [("grad_norm", "grad norm")], "global L2 norm", True),
    "throughput": ("throughput", [("tokens_per_s", "tokens/s")], "tokens / s", False),
    # MoE runs; moe_load's per-expert keys (moe_load/0, ...) are added by plot_run
    "moe_load": ("MoE: share of routed tokens per expert", [], "share", False),
    "moe_aux": ("MoE: router auxiliary loss", [("moe_aux_loss", "aux loss")], "loss", False),
    # train.eval_tasks (flaxlm/tasks): their keys are added by plot_run
    "tasks": ("benchmark tasks", [], "accuracy / exact match", False),
    "task_bits": ("benchmark tasks: perplexity", [], "bits per byte", False),
}
TASK_SHARES = ("/acc", "/acc_norm", "/exact_match")  # task metrics in [0, 1]


@dataclass
class RunMetrics:
    """``metrics.jsonl`` sorted out: per metric the effective (step, value) series (the last
    line written for a step wins), the values abandoned by rollbacks, and the events."""

    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    abandoned: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    stops: list[dict[str, Any]] = field(default_factory=list)
    # the peaks MFU was divided by: origin ("published:TPU v5 lite:bf16", "measured:cpu:fp32")
    # -> peak FLOP/s (the run's total), in the order first seen
    peaks: dict[str, float] = field(default_factory=dict)


def read_run_metrics(path: str | Path) -> RunMetrics:
    latest: dict[str, dict[int, float]] = {}
    out = RunMetrics()
    for record in read_metrics(path):
        event = record.get("event")
        if event == "rollback":
            out.rollbacks.append(record)
            continue
        if event is not None:
            out.stops.append(record)
            continue
        step = record.get("step")
        if step is None:
            continue
        if isinstance(record.get("peak_origin"), str):
            out.peaks[record["peak_origin"]] = record.get("peak_flops")
        if "val_loss" in record:  # an evaluation line: its accuracy is not the train accuracy
            record = {k if k.startswith("val_") else f"val_{k}": v for k, v in record.items()}
        for key, value in record.items():
            if key in ("step", "val_step"):
                continue
            values = {key: value}
            if isinstance(value, list):  # per-expert shares: moe_load/0, moe_load/1, ...
                values = {f"{key}/{i}": v for i, v in enumerate(value)}
            for name, v in values.items():
                if not isinstance(v, int | float) or isinstance(v, bool):
                    continue
                seen = latest.setdefault(name, {})
                if step in seen:
                    out.abandoned.setdefault(name, []).append((step, seen[step]))
                seen[step] = float(v)
    out.series = {k: sorted(v.items()) for k, v in latest.items()}
    return out


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Writes the plots and ``report.md``; returns the path of ``report.md``."""
    url = str(run_dir)  # a folder, or a run dir in a bucket (read through flaxlm.storage)
    metrics_path = storage.join(url, "metrics.jsonl")
    try:
        metrics = read_run_metrics(metrics_path)  # the file, or its segments in a bucket
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{metrics_path} does not exist (is {url} a run directory?)"
        ) from None
    # The plots are drawn locally: in RUN_DIR/report, or for a bucket in this host's cache
    # (with the run's evals beside them), then copied into RUN_DIR/report.
    run_dir = storage.local_cache(url)
    if not storage.is_posix(url) and storage.exists(storage.join(url, "evals")):
        storage.download_tree(storage.join(url, "evals"), run_dir / "evals")
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = plot_run(metrics, out)
    goodput_plot = plot_goodput(run_dir, out)  # goodput.jsonl: where the time went
    images += [goodput_plot] if goodput_plot is not None else []
    md = out / "report.md"
    md.write_text(summary_markdown(run_dir, metrics, [p.name for p in images], title=url))
    if not out_dir and not storage.is_posix(url):
        storage.upload_tree(out, storage.join(url, "report"))
    return md


def plot_run(metrics: RunMetrics, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    experts = sorted(
        (k for k in metrics.series if k.startswith("moe_load/")), key=lambda k: int(k[9:])
    )
    panels = dict(PANELS)
    title, _, ylabel, log = panels["moe_load"]
    panels["moe_load"] = (title, [(k, f"expert {k[9:]}") for k in experts], ylabel, log)
    tasks = sorted(k for k in metrics.series if k.startswith("val_tasks/"))
    for stem, keys in (
        ("tasks", [k for k in tasks if k.endswith(TASK_SHARES)]),
        ("task_bits", [k for k in tasks if k.endswith("/bits_per_byte")]),
    ):
        title, _, ylabel, log = panels[stem]
        panels[stem] = (title, [(k, k[len("val_tasks/") :]) for k in keys], ylabel, log)
    present = {k: v for k, v in panels.items() if any(metrics.series.get(m) for m, _ in v[1])}
    for stem, panel in present.items():
        fig, ax = plt.subplots(figsize=(7, 3.6))
        _draw(ax, metrics, *panel)
        written.append(_save(fig, out / f"{stem}.png", plt))
    if present:
        rows = math.ceil(len(present) / 2)
        fig, axes = plt.subplots(rows, 2, figsize=(12, 3.5 * rows), squeeze=False)
        for ax in axes.flat[len(present) :]:
            ax.axis("off")
        for ax, panel in zip(axes.flat, present.values(), strict=False):
            _draw(ax, metrics, *panel)
        written.insert(0, _save(fig, out / "overview.png", plt))
    return written


def _draw(ax, metrics: RunMetrics, title: str, keys, ylabel: str, log: bool) -> None:
    for key, label in keys:
        points = metrics.series.get(key)
        if not points:
            continue
        steps, values = np.array(points).T
        style = "o-" if key.startswith("val_") else "-"
        (line,) = ax.plot(steps, values, style, lw=1, ms=3, label=label)
        lost = metrics.abandoned.get(key)
        if lost:
            ax.plot(*np.array(lost).T, ".", color=line.get_color(), alpha=0.25, ms=3)
    for i, event in enumerate(metrics.rollbacks):
        ax.axvspan(event["restored_step"], event["step"], color="red", alpha=0.08)
        ax.axvline(event["step"], color="red", lw=1, ls="--", label="rollback" if i == 0 else None)
    if log and all(v > 0 for k, _ in keys for _, v in metrics.series.get(k, [])):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def _peak_text(item: tuple[str, Any]) -> str:
    origin, flops = item
    size = f"{flops / 1e12:,.3g} TFLOP/s" if isinstance(flops, int | float) else "?"
    return f"{size} (`{origin}`)"


def _task_table(reports: list[Path]) -> list[str]:
    """``flaxlm eval --tasks`` reports as a Markdown table, one row per task metric."""
    rows = []
    for path in reports:
        r = json.loads(path.read_text())
        for task, m in r.get("tasks", {}).items():
            for key, value in m.items():
                if key in ("num_fewshot", "docs") or key.endswith("_stderr"):
                    continue
                rows.append(f"| {path.name} | {task} | {m['num_fewshot']} | {key} | {value:.4f} |")
    if not rows:
        return []
    head = ["## Benchmark tasks (`flaxlm eval --tasks`)", ""]
    return [*head, "| report | task | shots | metric | value |", "|---|---|---|---|---|", *rows, ""]


def summary_markdown(
    run_dir: Path, metrics: RunMetrics, images: list[str], title: str | None = None
) -> str:
    """``title``: the run as the user named it (a bucket URL), when ``run_dir`` is this host's
    copy of its evals."""
    s = metrics.series
    lines = [f"# Run report: `{title or run_dir}`", ""]
    train = s.get("loss", [])
    if train:
        tail = [v for _, v in train[-10:]]
        lines.append(
            f"- steps logged: {len(train)}, last step {train[-1][0]}; train loss "
            f"{train[0][1]:.4f} -> {np.mean(tail):.4f} (mean of the last {len(tail)} logged)"
        )
    val = s.get("val_loss", [])
    if val:
        best_step, best = min(val, key=lambda p: p[1])
        lines.append(
            f"- validation loss: last {val[-1][1]:.4f} at step {val[-1][0]} "
            f"(perplexity {math.exp(min(val[-1][1], 50)):.2f}); best {best:.4f} at step {best_step}"
        )
    for key, label, fmt in (
        ("tokens_per_s", "tokens/s", "{:,.0f}"),
        ("mfu", "MFU", "{:.1%}"),
        ("grad_norm", "grad norm", "{:.3g}"),
    ):
        values = [v for _, v in s.get(key, [])]
        if values:
            line = f"- {label}: median {fmt.format(float(np.median(values)))}"
            if key == "mfu" and metrics.peaks:
                line += " of " + ", ".join(map(_peak_text, metrics.peaks.items()))
            lines.append(line)
    lines.append(f"- rollbacks: {len(metrics.rollbacks)}")
    lines.append("")
    if metrics.rollbacks:
        lines += ["| at step | restored step | data skipped | reason |", "|---|---|---|---|"]
        for e in metrics.rollbacks:
            skipped = e.get("skipped")
            skipped = "..".join(map(str, skipped)) if isinstance(skipped, list) else skipped
            lines.append(f"| {e['step']} | {e['restored_step']} | {skipped} | {e['reason']} |")
        lines.append("")
    for e in metrics.stops:
        lines.append(f"- {e.get('event')} at step {e.get('step')}: {e.get('reason', '')}")
    lines += goodput_table(run_dir)
    evals = sorted((run_dir / "evals").glob("*.json")) if (run_dir / "evals").is_dir() else []
    lines += _task_table([p for p in evals if ".tasks-" in p.name])
    evals = [p for p in evals if ".tasks-" not in p.name]  # flaxlm eval --tasks reports
    if evals:
        lines += ["## Evaluations (`flaxlm eval`)", ""]
        lines += ["| report | val_loss | perplexity | accuracy | tokens |", "|---|---|---|---|---|"]
        for path in evals:
            r = json.loads(path.read_text())
            lines.append(
                f"| {path.name} | {r['val_loss']:.4f} | {r['perplexity']:.2f} | "
                f"{r['accuracy']:.3f} | {r['tokens']:,} |"
            )
        lines.append("")
    lines += [f"![{Path(name).stem}]({name})" for name in images]
    return "\n".join(lines) + "\n"
