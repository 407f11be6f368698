"""The goodput section of ``flaxlm report``: where the run's wall-clock time went, from
``RUN_DIR/goodput.jsonl`` (flaxlm/train/goodput.py), across every restart.

``goodput_table`` gives the Markdown table (one row per part, seconds and share of the
wall-clock, the total last); ``plot_goodput`` draws ``goodput.png``: the running goodput over
wall-clock hours, with the restarts marked, beside one bar of the parts.
"""

from __future__ import annotations

from pathlib import Path

from flaxlm.train.goodput import PARTS, read_goodput

PART_LABELS = {
    "productive": "productive steps",
    "compile": "compilation (first step of each attempt)",
    "data": "waiting for data",
    "eval": "evaluation",
    "checkpoint_save": "checkpoint saves",
    "checkpoint_restore": "checkpoint restores (resumes, rollbacks)",
    "startup": "startup (data, model)",
    "rollback_discarded": "steps discarded by rollbacks",
    "restart_replayed": "steps trained again after a restart",
    "lost": "lost between a kill and the restart",
    "other": "other host work",
}


def goodput_table(run_dir: str | Path) -> list[str]:
    """Markdown lines: the goodput and its parts; [] for a run without ``goodput.jsonl``."""
    lines = read_goodput(run_dir)
    if not lines:
        return []
    last = lines[-1]
    wall = max(last["wall"], 1e-9)
    restarts = _attempts(lines) - 1
    out = [
        f"## Goodput: {last['goodput']:.1%} of {_duration(wall)} wall-clock "
        f"({restarts} restart(s))",
        "",
        "| part | seconds | share |",
        "|---|---:|---:|",
    ]
    for part in PARTS:
        seconds = last["parts"].get(part, 0.0)
        out.append(f"| {part}: {PART_LABELS[part]} | {seconds:,.1f} | {seconds / wall:.1%} |")
    total = sum(last["parts"].values())
    out += [f"| total | {total:,.1f} | {total / wall:.1%} |", ""]
    return out


def _attempts(lines: list[dict]) -> int:
    """Attempts: a line whose ``lost`` grew started one (only a restart adds to it)."""
    count, lost = 1, 0.0
    for line in lines:
        if line["parts"].get("lost", 0.0) > lost:
            count, lost = count + 1, line["parts"]["lost"]
    return count


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def plot_goodput(run_dir: str | Path, out: Path) -> Path | None:
    """``out/goodput.png``; None for a run without ``goodput.jsonl``."""
    lines = read_goodput(run_dir)
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    scale, unit = (3600.0, "h") if lines[-1]["wall"] > 7200 else (60.0, "min")
    left.plot([r["wall"] / scale for r in lines], [r["goodput"] for r in lines], "-", lw=1)
    lost = 0.0
    for r in lines:
        if r["parts"].get("lost", 0.0) > lost:  # the first line of a restarted attempt
            lost = r["parts"]["lost"]
            left.axvline(r["wall"] / scale, color="red", lw=1, ls="--")
    left.set_ylim(0, 1)
    left.set(title="goodput (restarts dashed)", xlabel=f"wall-clock ({unit})", ylabel="goodput")
    left.grid(alpha=0.3)
    bottom, parts = 0.0, lines[-1]["parts"]
    for part in PARTS:
        seconds = parts.get(part, 0.0)
        if seconds > 0:
            right.bar(0, seconds / scale, bottom=bottom, label=part)
            bottom += seconds / scale
    right.set(title="where the time went", ylabel=unit, xticks=[])
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    path = out / "goodput.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
