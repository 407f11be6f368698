"""The training loop, read top to bottom: data, model, state (fresh or resumed), then steps.

    from flaxlm.config import load_config
    from flaxlm.train import train
    result = train(load_config("configs/gpt_demo.yaml", ["train.steps=200"]))

The device never waits for the host: step k+1 is dispatched before the metrics of step k are
read, and the next batch is assembled on the host while the current step runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from flaxlm.checkpoint import Checkpointer
from flaxlm.config import Config, save_config, to_dict
from flaxlm.data import CausalBatches, prepare_data
from flaxlm.models import build_model
from flaxlm.optim import make_optimizer
from flaxlm.perf import flops_per_token, measure_matmul_peak
from flaxlm.sharding import build_mesh
from flaxlm.train.batches import check_batch_fits, evaluate_batches, put_train_batch
from flaxlm.train.metrics_log import MetricsLog
from flaxlm.train.state import abstract_state, create_state, state_shardings
from flaxlm.train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # every logged train record
    evals: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None


def train(cfg: Config, stop_at_step: int | None = None) -> TrainResult:
    """Trains (or resumes) the run in ``cfg.train.run_dir`` up to ``cfg.train.steps``.

    ``stop_at_step`` ends this invocation early at that step, with a checkpoint — what a
    preempted job does; running ``train`` again on the same run dir continues from there.
    """
    run_dir = Path(cfg.train.run_dir)
    is_main = jax.process_index() == 0
    show = is_main and cfg.train.progress
    seq_len, global_batch, accum = cfg.data.seq_len, cfg.train.batch_size, cfg.train.grad_accum

    # Data first: it is the slowest thing to fail on, and the tokenizer must fit the model.
    data = prepare_data(cfg.data, cfg.model.vocab_size, progress=show)
    train_batches = CausalBatches(data.train, seq_len, global_batch, cfg.train.seed)
    val_batches = CausalBatches(
        data.val, seq_len, global_batch // accum, cfg.train.seed, shuffle=False
    )

    mesh = build_mesh(cfg.mesh)
    check_batch_fits(global_batch, accum, mesh)
    model = build_model(cfg.model)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.d_model)
    state_sh = state_shardings(model, tx, mesh, seq_len)

    # Resume from the newest checkpoint of this run dir, or start fresh.
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "tokenizer.model").write_bytes(data.tokenizer.model_bytes)
    ckpt = Checkpointer(run_dir, cfg.checkpoint.keep, cfg.checkpoint.asynchronous)
    resumed_from = ckpt.latest_step()
    if resumed_from is not None:
        state, meta = ckpt.restore(abstract_state(model, tx, seq_len), state_sh)
        data_index = int(meta["data_index"])
    else:
        state, _ = create_state(model, tx, mesh, seq_len, cfg.train.seed, shardings=state_sh)
        data_index = 0
    step = int(jax.device_get(state.step))
    last_step = cfg.train.steps if stop_at_step is None else min(stop_at_step, cfg.train.steps)
    log = MetricsLog(run_dir, enabled=is_main, resume_from_step=step)
    result = TrainResult(run_dir=run_dir, step=step, resumed_from=resumed_from)
    if resumed_from is not None and is_main:
        print(f"resuming {run_dir} from step {step}")

    train_step = jit_train_step(make_train_step(model, cfg, schedule), mesh, state_sh)
    eval_step = jit_eval_step(make_eval_step(model, cfg), mesh, state_sh.params)
    tokens_per_step = global_batch * seq_len
    model_flops = flops_per_token(cfg.model, seq_len) * tokens_per_step
    peak_flops = measure_matmul_peak() if show else float("nan")

    def run_eval(at_step: int) -> dict[str, Any]:
        batches = val_batches.eval_batches(
            global_batch // accum, cfg.train.eval_batches, jax.process_index(), jax.process_count()
        )
        record = {"step": at_step, **evaluate_batches(eval_step, state.params, batches, mesh)}
        log.write(record)
        result.evals.append(record)
        return record

    def save(at_step: int) -> None:
        meta = {"data_index": data_index, "seed": cfg.train.seed, "config": to_dict(cfg)}
        ckpt.save(state, meta, data.tokenizer.model_bytes)

    bar = tqdm(total=last_step, initial=step, disable=not show, unit="step", dynamic_ncols=True)
    pending: tuple[int, Any] | None = None  # (step, device metrics) not yet read
    window_start, window_steps = time.perf_counter(), 0
    next_local = train_batches.batch(data_index, jax.process_index(), jax.process_count())
    while step < last_step:
        state, metrics = train_step(state, put_train_batch(next_local, mesh, accum))
        step += 1
        data_index += 1
        window_steps += 1
        # Host work overlaps the step just dispatched.
        if step < last_step:
            next_local = train_batches.batch(data_index, jax.process_index(), jax.process_count())
        if pending is not None:
            window_start, window_steps = _log_train(
                pending,
                log,
                bar,
                result,
                window_start,
                window_steps,
                tokens_per_step,
                model_flops,
                peak_flops,
            )
            pending = None
        if step % cfg.train.log_every == 0 or step == last_step:
            pending = (step, metrics)
        if step % cfg.checkpoint.every == 0 and step != last_step:
            save(step)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
            record = run_eval(step)
            bar.write(
                f"step {step}: val_loss {record['val_loss']:.4f}  ppl {record['perplexity']:.1f}"
            )
            window_start = time.perf_counter()  # keep eval time out of tokens/s
        bar.update(1)
    if pending is not None:
        _log_train(
            pending,
            log,
            bar,
            result,
            window_start,
            window_steps,
            tokens_per_step,
            model_flops,
            peak_flops,
        )
    bar.close()

    if ckpt.latest_step() != step:
        save(step)
    if step == cfg.train.steps and (not result.evals or result.evals[-1]["step"] != step):
        record = run_eval(step)
        if show:
            print(f"step {step}: val_loss {record['val_loss']:.4f}  ppl {record['perplexity']:.1f}")
    ckpt.close()  # waits until every checkpoint is durable
    log.plot()
    log.close()
    result.step = step
    return result


def _log_train(
    pending, log, bar, result, window_start, window_steps, tokens_per_step, model_flops, peak
):
    """Reads one step's metrics (already computed: a later step has been dispatched)."""
    step, metrics = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    elapsed = max(now - window_start, 1e-9)
    tokens_per_s = window_steps * tokens_per_step / elapsed
    mfu = model_flops * window_steps / elapsed / peak if np.isfinite(peak) else None
    record = {
        "step": step,
        "loss": values["loss"],
        "accuracy": values["accuracy"],
        "lr": values["lr"],
        "grad_norm": values["grad_norm"],
        "tokens_per_s": tokens_per_s,
    }
    if mfu is not None:
        record["mfu"] = mfu
    log.write(record)
    result.history.append(record)
    postfix = {"loss": f"{values['loss']:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
    if mfu is not None:
        postfix["mfu"] = f"{100 * mfu:.0f}%"
    bar.set_postfix(postfix, refresh=False)
    return now, 0
