"""Where metrics go: ``metrics.jsonl`` (one JSON object per line), TensorBoard events,
``loss.png`` and, with ``logging.wandb``, a Weights & Biases run (flaxlm/train/wandb_log.py).
Only process 0 writes; the others get a logger that does nothing. In a run dir on an object
store the lines go into segments merged on read (flaxlm/train/metrics_segments.py), and the
TensorBoard events and the plot are written locally and copied there when the log closes."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flaxlm import storage
from flaxlm.train.metrics_segments import SegmentedLog, segment_lines

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
        self.run_dir = storage.native(run_dir)  # a Path, or a URL (str) on an object store
        self.path = storage.native(storage.join(str(run_dir), "metrics.jsonl"))
        self.enabled = enabled
        self.lines = 0
        self._tb = None
        self._file = None
        self._segments = None if storage.is_posix(str(run_dir)) else SegmentedLog(str(run_dir))
        self._local = self.run_dir  # TensorBoard and the plot; a temporary folder for a URL
        self._wandb = wandb if enabled else None
        if not enabled:
            return
        if self._segments is not None:
            self._local = Path(tempfile.mkdtemp(prefix="flaxlm-metrics-"))
            self.lines = self._segments.open(
                lambda lines: _kept(lines, resume_from_step, keep_lines)
            )
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._truncate(resume_from_step, keep_lines)
            self._file = self.path.open("a")
        if self._wandb is not None:  # the events kept so far seed its events table
            self._wandb.start(_events(self.path))

    def _truncate(self, step: int, keep_lines: int | None) -> None:
        """Rewritten atomically: a kill here leaves the old file or the new one."""
        if not self.path.exists():
            return
        kept = _kept(self.path.read_text().splitlines(), step, keep_lines)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self.lines = len(kept)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        if self._segments is not None:
            self._segments.append(json.dumps(clean))
        else:
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

            self._tb = SummaryWriter(str(self._local / "tensorboard"))
        return self._tb

    def plot(self) -> Path | None:
        """Writes ``loss.png`` (train and validation loss against step)."""
        if not self.enabled:
            return None
        self.flush()
        out = plot_loss(self.path, self._local / "loss.png")
        if out is not None and self._segments is not None:
            storage.write_bytes(storage.join(str(self.run_dir), "loss.png"), out.read_bytes())
            return None
        return out

    def flush(self) -> None:
        """Makes every line written so far readable in the run dir (a checkpoint counts them)."""
        if self._segments is not None:
            self._segments.flush()

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
        if self._segments is not None and self.enabled:
            self._segments.flush()
            if (self._local / "tensorboard").is_dir():
                tensorboard = storage.join(str(self.run_dir), "tensorboard")
                storage.upload_tree(self._local / "tensorboard", tensorboard)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (or of its segments, in a run dir on an object store);
    a torn last line (crash mid-write) is ignored."""
    records = []
    for line in metric_lines(path):
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


def metric_lines(path: str | Path) -> list[str]:
    """The lines of ``RUN_DIR/metrics.jsonl``: the file, or its segments merged; a
    FileNotFoundError naming ``path`` when there is neither."""
    try:
        return storage.read_text(str(path)).splitlines()
    except FileNotFoundError:
        lines = segment_lines(storage.parent_of(str(path)))
        if not lines:
            raise FileNotFoundError(f"{path} does not exist") from None
        return lines


def _kept(lines: list[str], step: int, keep_lines: int | None) -> list[str]:
    """The lines of an earlier attempt that a resume at ``step`` keeps (see MetricsLog)."""
    lines = [line for line in lines if _parses(line)]
    if keep_lines is not None:
        return lines[:keep_lines]
    return [line for line in lines if json.loads(line).get("step", 0) <= step]


def _events(path: Path | str) -> list[dict[str, Any]]:
    """The event records of a metrics.jsonl (only their lines are parsed)."""
    try:
        lines = metric_lines(path)
    except FileNotFoundError:
        lines = []
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
