"""What a run shows and writes while it trains: one metrics.jsonl line per logged step (and per
eval and rollback), the progress bar with loss, tokens/s and MFU, and the honest throughput
meter (flaxlm/train/throughput.py) behind both. A line with ``mfu`` also carries the peak it
was divided by, ``peak_flops`` (per chip times chips; a CPU: the machine), and where that peak
comes from, ``peak_origin`` (``published:<device kind>:<dtype>`` or ``measured:cpu:<dtype>``)."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from flaxlm.config import Config
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.families import Family, summary_line
from flaxlm.runtime.peaks import run_peak
from flaxlm.train import moe_terms
from flaxlm.train.flops import model_flops_per_token
from flaxlm.train.goodput import GoodputClock
from flaxlm.train.metrics_log import MetricsLog
from flaxlm.train.throughput import Throughput

STEP_FIELDS = ("loss", "accuracy", "lr", "grad_norm")


class StepReporter:
    def __init__(
        self,
        cfg: Config,
        family: Family,
        log: MetricsLog,
        show: bool,
        step: int,
        last_step: int,
        ramp: BatchRamp,
        goodput: GoodputClock | None = None,
    ):
        """``ramp``: the run's BatchRamp (the rows of each data position), the same one its
        batches and LR schedule follow. ``goodput``: the run's clock (flaxlm/train/goodput.py);
        each logged step record carries its ``goodput``."""
        self.cfg, self.family, self.log, self.show = cfg, family, log, show
        self.last_step = last_step
        self.ramp, self.goodput = ramp, goodput
        tokens = cfg.train.batch_size * cfg.data.seq_len
        flops = model_flops_per_token(cfg) * tokens
        # The peak MFU divides by (flaxlm/runtime/peaks.py): published for TPUs and GPUs,
        # measured once per machine and dtype and cached on a CPU; None for an unknown chip.
        self.peak = run_peak(jax.devices(), cfg.model.dtype) if show else None
        total = self.peak.total if self.peak is not None else float("nan")
        self.meter = Throughput(tokens, flops, total)
        self.bar = tqdm(total=last_step, initial=step, disable=not show, unit="step",
                        dynamic_ncols=True)  # fmt: skip
        self.history: list[dict[str, Any]] = []
        self._rate: dict[str, float] = {}

    def step_done(
        self, step: int, metrics: dict[str, Any], force: bool = False, data_index: int = -1
    ) -> dict | None:
        """Step ``step``'s metrics (host values) were read. Logs them every ``train.log_every``
        steps, at the last step, and whenever ``force`` (a bad step). Returns the record.
        ``data_index``: the data position the step trained on; under ``train.batch_ramp`` its
        batch size is logged, and tokens/s and MFU count the rows actually trained."""
        rows = self.ramp.size(data_index) if data_index >= 0 else self.ramp.full
        self.meter.step_done(step, rows / self.ramp.full)
        if not (force or step % self.cfg.train.log_every == 0 or step == self.last_step):
            return None
        record = {"step": step, **{k: float(metrics[k]) for k in STEP_FIELDS}}
        if self.ramp.ramped:
            record["batch_size"] = rows
        record.update(self.meter.rate())
        if self.goodput is not None:
            record["goodput"] = self.goodput.fraction()
        if "mfu" in record and self.peak is not None:
            record.update(peak_flops=self.peak.total, peak_origin=self.peak.origin)
        record.update(self.family.log_fields(self.cfg, metrics))
        record.update(moe_terms.log_fields(metrics))
        self.log.write(record)
        self.history.append(record)
        self._rate = {k: record[k] for k in ("tokens_per_s", "mfu") if k in record}
        self.bar.set_postfix(self._postfix(record["loss"]), refresh=False)
        return record

    def _postfix(self, loss: float) -> dict[str, str]:
        out = {"loss": f"{loss:.3f}"}
        if "tokens_per_s" in self._rate:
            out["tok/s"] = f"{self._rate['tokens_per_s']:,.0f}"
        if "mfu" in self._rate:
            out["mfu"] = f"{100 * self._rate['mfu']:.0f}%"
        return out

    def advanced(self) -> None:
        """One more step dispatched."""
        self.bar.update(1)

    @contextlib.contextmanager
    def paused(self, in_flight: Any = None) -> Iterator[None]:
        """Keeps an eval, a save or a rollback off the throughput clock; the step in flight
        (a pending step with ``.step`` and ``.metrics``) finishes on the clock first."""
        if in_flight is not None:
            jax.block_until_ready(in_flight.metrics)
            self.meter.step_done(in_flight.step)
        self.meter.pause()
        try:
            yield
        finally:
            self.meter.resume()

    def evaluated(self, record: dict[str, Any], final: bool = False) -> dict[str, Any]:
        """Logs an eval record and shows its summary line; returns the record. A non-finite
        validation loss is also an ``eval_not_finite`` event and a warning (in the record
        itself it is written as null, to keep every line strict JSON)."""
        self.log.write(record)
        if not math.isfinite(record["val_loss"]):
            message = f"evaluation at step {record['step']} gave val_loss {record['val_loss']}"
            self.log.write({"event": "eval_not_finite", "step": record["step"], "reason": message})
            warnings.warn(message, stacklevel=2)
        line = f"step {record['step']}: {summary_line(record, self.family)}"
        if self.show and final:
            print(line)
        elif self.show:
            self.bar.write(line)
        return record

    def rolled_back(self, event: dict[str, Any], restored_step: int) -> None:
        self.log.write(event)
        if self.show:
            self.bar.write(
                f"step {event['step']}: {event['reason']} -> rolled back to step "
                f"{restored_step}, skipping data positions {event['skipped'][0]}.."
                f"{event['skipped'][1]}"
            )
        self.bar.reset(total=self.last_step)
        self.bar.update(restored_step)
        self.meter.restart()

    def run_rates(self) -> dict[str, Any]:
        """The run's mean ``tokens_per_s`` and ``mfu`` over all its logged windows (this
        process; compilation, evals and saves off the clock), with the peak's origin."""
        out: dict[str, Any] = dict(self.meter.overall())
        if "mfu" in out and self.peak is not None:
            out["peak_origin"] = self.peak.origin
        return out

    def close(self) -> None:
        self.bar.close()


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a step's fetched metrics, as floats."""
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
