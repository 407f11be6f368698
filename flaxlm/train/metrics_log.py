"""Where metrics go: ``metrics.jsonl`` (one JSON object per line), TensorBoard events,
``loss.png`` and, with ``logging.wandb``, a Weights & Biases run (flaxlm/train/wandb_log.py).
Only process 0 writes; the others get a logger that does nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flaxlm.train.wandb_log import WandbLog


class MetricsLog:
    """``keep_lines``: on resume, the number of lines the file held when the checkpoint (or
    rollback) the run resumes from was written; later lines belong to the lost attempt and are
    replayed, so they are dropped and the file reads as if the run had never stopped. Without
    it (an old checkpoint), lines after ``resume_from_step`` are dropped instead. ``lines``
    counts the lines written so far. ``wandb``: a W&B logger that every record also goes to
    (started here, finished by :meth:`close`)."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        resume_from_step: int = 0,
        keep_lines: int | None = None,
        wandb: WandbLog | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.lines = 0
        self._tb = None
        self._file = None
        self._wandb = wandb if enabled else None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_from_step, keep_lines)
        self._file = self.path.open("a")
        if self._wandb is not None:  # the events kept so far seed its events table
            self._wandb.start(_events(self.path))

    def _truncate(self, step: int, keep_lines: int | None) -> None:
        """Rewritten atomically: a kill here leaves the old file or the new one."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if _parses(line)]
        if keep_lines is not None:
            kept = lines[:keep_lines]
        else:
            kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self.lines = len(kept)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        self.lines += 1
        if self._wandb is not None:
            self._wandb.write(clean)
        writer = self._tensorboard()
        step = clean.get("step", 0)
        if "event" in clean:  # rollbacks, stops: a text entry TensorBoard shows at that step
            writer.add_text(f"events/{clean['event']}", json.dumps(clean), step)
            return
        for key, value in clean.items():
            # a list (MoE: each expert's share of the tokens) is one scalar per entry
            values = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, v in values:
                if key != "step" and isinstance(v, int | float) and math.isfinite(v):
                    writer.add_scalar(key if i is None else f"{key}/{i}", v, step)

    def _tensorboard(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tb

    def plot(self) -> Path | None:
        """Writes ``loss.png`` (train and validation loss against step)."""
        if not self.enabled:
            return None
        return plot_loss(self.path, self.run_dir / "loss.png")

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Closes the file and TensorBoard; ends the W&B run with ``summary`` in its summary."""
        if self._wandb is not None:
            self._wandb.finish(summary)
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; a torn last line (crash mid-write) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*np.array(train).T, label="train loss", lw=1)
    if val:
        ax.plot(*np.array(val).T, "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(out_path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_path)
    return Path(out_path)


def _events(path: Path) -> list[dict[str, Any]]:
    """The event records of a metrics.jsonl (only their lines are parsed)."""
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if '"event"' in line and _parses(line)]
    return [r for r in records if "event" in r]


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False  # a torn last line
    return True


def _plain(value: Any) -> Any:
    """numpy -> Python; NaN / inf -> null, so every line is strict JSON (jq, JSON.parse)."""
    if isinstance(value, np.generic | np.ndarray):
        value = value.item() if np.ndim(value) == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
