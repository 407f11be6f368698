"""The training loop, read top to bottom: data, model, state (fresh or resumed), then steps.

    from flaxlm.config import load_config
    from flaxlm.train import train
    result = train(load_config("configs/gpt_demo.yaml", ["train.steps=200"]))

The device never waits for the host: step k+1 is dispatched before the metrics of step k are
read, and the next batch is assembled on the host while the current step runs. Every step's
loss and gradient norm go through the spike guard; a bad step rolls the run back to the newest
known-good checkpoint and the data since then goes into the skip ledger (flaxlm/train/guard.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from flaxlm.checkpoint import Checkpointer
from flaxlm.config import Config, save_config, to_dict
from flaxlm.data import CausalBatches, MixtureBatches, make_train_batches, prepare_data
from flaxlm.data.masked import OBJECTIVES, make_masked_batches
from flaxlm.data.masked import batch_keys as masked_batch_keys
from flaxlm.models import build_model
from flaxlm.optim import make_optimizer
from flaxlm.perf import flops_per_token, measure_matmul_peak
from flaxlm.sharding import build_mesh
from flaxlm.train.batches import check_batch_fits, evaluate_batches, put_train_batch
from flaxlm.train.guard import RollbackPolicy, SkipLedger, SpikeDetector, TrainingDiverged
from flaxlm.train.masked_step import BERT_METRICS, evaluate_masked_batches
from flaxlm.train.metrics_log import MetricsLog
from flaxlm.train.preemption import PreemptionGuard
from flaxlm.train.state import abstract_state, create_state, state_shardings
from flaxlm.train.step import (
    BATCH_KEYS,
    MIXTURE_BATCH_KEYS,
    jit_eval_step,
    jit_train_step,
    make_eval_step,
    make_train_step,
    step_controls,
)
from flaxlm.train.watchdog import Watchdog


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # every logged train record
    evals: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    preempted: str | None = None  # the signal that stopped the run early, if any
    process_index: int = 0


@dataclass
class _Pending:
    """A dispatched step whose metrics have not been read yet."""

    step: int
    data_index: int
    metrics: Any


def train(cfg: Config, stop_at_step: int | None = None) -> TrainResult:
    """Trains (or resumes) the run in ``cfg.train.run_dir`` up to ``cfg.train.steps``.

    ``stop_at_step`` ends this invocation early at that step, with a checkpoint — what a
    preempted job does; running ``train`` again on the same run dir continues from there.
    Raises :class:`TrainingDiverged` when rollbacks exceed the configured bounds.
    """
    run_dir = Path(cfg.train.run_dir)
    is_main = jax.process_index() == 0
    show = is_main and cfg.train.progress
    seq_len, global_batch, accum = cfg.data.seq_len, cfg.train.batch_size, cfg.train.grad_accum
    proc = (jax.process_index(), jax.process_count())

    # Data first: it is the slowest thing to fail on, and the tokenizer must fit the model.
    data = prepare_data(cfg.data, cfg.model.vocab_size, progress=show)
    is_bert = cfg.model.family == "bert"
    if is_bert:  # masked LM (+ NSP) or the unified objective: masks drawn from (seed, example)
        train_batches = make_masked_batches(data.train, cfg, data.tokenizer, global_batch)
        val_batches = make_masked_batches(
            data.val, cfg, data.tokenizer, global_batch // accum, shuffle=False
        )
    else:
        train_batches = make_train_batches(data, seq_len, global_batch, cfg.train.seed)
        val_batches = CausalBatches(
            data.val, seq_len, global_batch // accum, cfg.train.seed, shuffle=False
        )
    # A mixture's batches say which source each row came from: the step logs per-source loss.
    source_names = train_batches.names if isinstance(train_batches, MixtureBatches) else []
    if is_bert:
        keys = masked_batch_keys(cfg)
    else:
        keys = MIXTURE_BATCH_KEYS if source_names else BATCH_KEYS

    mesh = build_mesh(cfg.mesh)
    check_batch_fits(global_batch, accum, mesh)
    model = build_model(cfg.model)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.d_model)
    state_sh = state_shardings(model, tx, mesh, seq_len)
    abstract = abstract_state(model, tx, seq_len)

    def fresh_state():
        return create_state(model, tx, mesh, seq_len, cfg.train.seed, shardings=state_sh)[0]

    # Resume from the newest intact checkpoint of this run dir, or start fresh.
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "tokenizer.model").write_bytes(data.tokenizer.model_bytes)
    ckpt = Checkpointer(run_dir, cfg.checkpoint.keep, cfg.checkpoint.asynchronous)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract, state_sh)
        data_index = int(meta["data_index"])
        ledger = SkipLedger.from_json(meta.get("skip_ledger"))
        policy = RollbackPolicy.from_json(cfg.guard, meta.get("rollback_policy"))
        resumed_from = int(meta["step"])
        ckpt.delete_after(resumed_from)  # damaged or unsealed newer folders
    else:
        state, data_index, resumed_from = fresh_state(), 0, None
        ledger, policy = SkipLedger(), RollbackPolicy(cfg.guard)
    step = int(jax.device_get(state.step))
    last_step = cfg.train.steps if stop_at_step is None else min(stop_at_step, cfg.train.steps)
    log = MetricsLog(run_dir, enabled=is_main, resume_from_step=step)
    result = TrainResult(
        run_dir=run_dir, step=step, resumed_from=resumed_from, process_index=proc[0]
    )
    if resumed_from is not None and is_main:
        skipped = f", skip ledger {ledger.to_json()}" if ledger.windows else ""
        print(f"resuming {run_dir} from step {step}{skipped}")

    train_step = jit_train_step(
        make_train_step(model, cfg, schedule, n_sources=len(source_names)),
        mesh,
        state_sh,
        keys,
    )
    eval_step = jit_eval_step(
        make_eval_step(model, cfg), mesh, state_sh.params, keys if is_bert else BATCH_KEYS
    )
    detector = SpikeDetector(cfg.guard)
    speed = _Speedometer(cfg, seq_len, global_batch, measure_peak=show)
    chaos_spikes, chaos_nans = set(cfg.chaos.spike_at_steps), set(cfg.chaos.nan_at_steps)
    cooldown_until = 0

    def run_eval(at_step: int) -> dict[str, Any]:
        watchdog.enter("eval", at_step)
        batches = val_batches.eval_batches(global_batch // accum, cfg.train.eval_batches, *proc)
        if is_bert:
            metrics = evaluate_masked_batches(eval_step, state.params, batches, mesh, cfg)
        else:
            metrics = evaluate_batches(eval_step, state.params, batches, mesh)
        record = {"step": at_step, **metrics}
        log.write(record)
        result.evals.append(record)
        speed.restart()  # keep evaluation time out of tokens/s
        return record

    def save() -> None:
        watchdog.enter("checkpoint", step)
        meta = {
            "data_index": data_index,
            "seed": cfg.train.seed,
            "skip_ledger": ledger.to_json(),
            "rollback_policy": policy.to_json(),
            "config": to_dict(cfg),
        }
        policy.saved(step, data_index)
        ckpt.save(state, meta, data.tokenizer.model_bytes, protect=policy.protected())

    def check(pending: _Pending) -> str | None:
        """Reads a finished step's metrics, logs them, returns why it is bad (or None)."""
        fetched = jax.device_get(pending.metrics)
        speed.tick()
        values = {k: float(v) for k, v in fetched.items() if np.ndim(v) == 0}
        reason = detector.check(values["loss"], values["grad_norm"]) if cfg.guard.enabled else None
        if reason is None:
            policy.healthy_through(pending.step)
        if reason or pending.step % cfg.train.log_every == 0 or pending.step == last_step:
            record = {"step": pending.step, **speed.record(values, pending.step)}
            if source_names:
                per_source = zip(
                    source_names, fetched["source_loss"], fetched["source_tokens"], strict=True
                )
                for name, loss, n in per_source:
                    if n > 0:  # a small batch may hold no row of a rare source
                        record[f"loss/{name}"] = float(loss)
            if is_bert:  # per-objective losses (BERT: MLM / NSP; unified: each objective's)
                record.update({k: values[k] for k in BERT_METRICS if k in values})
                if "objective_loss" in fetched:
                    per_objective = zip(
                        OBJECTIVES, fetched["objective_loss"], fetched["objective_tokens"],
                        strict=True,
                    )  # fmt: skip
                    for name, loss, n in per_objective:
                        if n > 0:
                            record[f"{name}_loss"] = float(loss)
            log.write(record)
            result.history.append(record)
            bar.set_postfix(speed.postfix(values), refresh=False)
        return reason

    def rollback(bad: _Pending, reason: str) -> None:
        nonlocal state, step, data_index, cooldown_until
        watchdog.enter("rollback", bad.step)
        try:
            plan = policy.plan(bad.step, bad.data_index, set(ckpt.steps()))
        except TrainingDiverged as exc:
            log.write({"event": "stopped", "step": bad.step, "reason": f"{reason}; {exc}"})
            raise
        ckpt.delete_after(plan.restore_step)
        if plan.restore_step == 0:
            state = fresh_state()
        else:
            state, _ = ckpt.restore(abstract, state_sh, plan.restore_step)
        ledger.add(*plan.window)
        step = plan.restore_step
        data_index = ledger.next_allowed(plan.restore_data_index)
        detector.reset()
        cooldown_until = step + cfg.guard.cooldown_steps
        event = {
            "event": "rollback",
            "step": bad.step,
            "restored_step": plan.restore_step,
            "skipped": list(plan.window),
            "reason": reason,
        }
        log.write(event)
        result.rollbacks.append(event)
        if is_main:
            (run_dir / "skip_ledger.json").write_text(json.dumps(ledger.to_json()))
            bar.write(
                f"step {bad.step}: {reason} -> rolled back to step {plan.restore_step}, "
                f"skipping data positions {plan.window[0]}..{plan.window[1]}"
            )
        bar.reset(total=last_step)
        bar.update(step)

    bar = tqdm(total=last_step, initial=step, disable=not show, unit="step", dynamic_ncols=True)
    pending: _Pending | None = None
    next_local = train_batches.batch(data_index, *proc)
    watchdog = Watchdog(cfg.train.watchdog_factor, cfg.train.watchdog_min_s)
    with PreemptionGuard() as preempt, watchdog:
        while True:
            watchdog.enter("step", step + 1)
            if step >= last_step or preempt.requested:
                # Drain: the last dispatched step is checked before anything is saved.
                if pending is not None:
                    last, pending = pending, None
                    reason = check(last)
                    if reason is not None:
                        rollback(last, reason)
                        next_local = train_batches.batch(data_index, *proc)
                        continue
                break

            if step + 1 in cfg.chaos.hang_at_steps and data_index == step:
                time.sleep(1e6)  # chaos: a stalled host, for the watchdog to catch
            controls = step_controls(
                lr_scale=(cfg.guard.cooldown_factor if step < cooldown_until else 1.0)
                * (cfg.chaos.spike_lr_scale if data_index + 1 in chaos_spikes else 1.0),
                inject_nan=data_index + 1 in chaos_nans,
            )
            state, metrics = train_step(state, put_train_batch(next_local, mesh, accum), controls)
            dispatched = _Pending(step + 1, data_index, metrics)
            step += 1
            data_index = ledger.next_allowed(data_index + 1)
            if step < last_step:  # host work overlaps the step just dispatched
                next_local = train_batches.batch(data_index, *proc)

            if pending is not None:
                reason = check(pending)
                if reason is not None:
                    rollback(pending, reason)
                    pending = None
                    next_local = train_batches.batch(data_index, *proc)
                    continue
            pending = dispatched
            if step % cfg.checkpoint.every == 0 and step != last_step:
                save()
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                record = run_eval(step)
                if show:
                    bar.write(f"step {step}: val_loss {record['val_loss']:.4f}")
            bar.update(1)
    bar.close()
    result.preempted = preempt.signal_name

    if ckpt.latest_step() != step:
        save()
    if step == cfg.train.steps and (not result.evals or result.evals[-1]["step"] != step):
        record = run_eval(step)
        if show:
            print(f"step {step}: val_loss {record['val_loss']:.4f}  ppl {record['perplexity']:.1f}")
    ckpt.close()  # waits until every checkpoint is durable, manifests included
    if result.preempted and is_main:
        print(f"{result.preempted}: checkpoint saved at step {step} in {run_dir}; rerun to resume")
    log.plot()
    log.close()
    result.step = step
    return result


class _Speedometer:
    """Tokens/s and MFU over the steps since the last logged one."""

    def __init__(self, cfg: Config, seq_len: int, global_batch: int, measure_peak: bool):
        self.tokens_per_step = global_batch * seq_len
        self.flops_per_step = flops_per_token(cfg.model, seq_len) * self.tokens_per_step
        self.peak = measure_matmul_peak() if measure_peak else float("nan")
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.steps += 1

    def record(self, values: dict[str, float], step: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        out = {
            "loss": values["loss"],
            "accuracy": values["accuracy"],
            "lr": values["lr"],
            "grad_norm": values["grad_norm"],
            "tokens_per_s": self.steps * self.tokens_per_step / elapsed,
        }
        if np.isfinite(self.peak):
            out["mfu"] = self.steps * self.flops_per_step / elapsed / self.peak
        self.start, self.steps = now, 0
        self._last = out
        return out

    def postfix(self, values: dict[str, float]) -> dict[str, str]:
        last = getattr(self, "_last", {})
        out = {"loss": f"{values['loss']:.3f}"}
        if "tokens_per_s" in last:
            out["tok/s"] = f"{last['tokens_per_s']:,.0f}"
        if "mfu" in last:
            out["mfu"] = f"{100 * last['mfu']:.0f}%"
        return out
