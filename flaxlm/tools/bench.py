"""``flaxlm bench``: train-step speed and MFU against the same peak training uses.

    flaxlm bench configs/bench/gpt_small_cpu.yaml --json
    flaxlm bench configs/bench/bert_small_cpu.yaml --what all --steps 10

MFU divides by the peak of :mod:`flaxlm.runtime.peaks`, as the training loop's does: the
published per-chip peak for the model's dtype on a TPU or GPU, the cached measured peak on a
CPU; the report names it (``peak_flops``, ``peak_origin``). Absolute times on a shared
machine drift by 2x within seconds, so every rate is also paired with a matmul probe in the
model's dtype measured right before and right after it: a > 20 % gap between them is flagged,
and ``mfu_same_run`` is taken against their mean.

The train step runs on random tokens (no data files); ``data`` times the input pipeline alone
(the config's ``data.paths``, else the demo corpus in a temp dir), ``decode`` the KV cache
against re-running the prefix (:mod:`flaxlm.tools.bench_phases`).
"""

from __future__ import annotations

import contextlib
import math
import resource
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from flaxlm.config import Config, ModelConfig
from flaxlm.families import family_of
from flaxlm.runtime.host_memory import huge_pages_in_force
from flaxlm.runtime.peaks import Peak, default_cache_path, raise_cpu_peak, run_peak
from flaxlm.train.flops import family_flops_report, flops_per_token, measure_matmul_peak
from flaxlm.train.profiling import STEP_NAME

PEAK_TOLERANCE = 0.2  # before/after peaks further apart than this: a noisy machine
WHATS = ("train", "data", "decode", "checkpoint", "all")


def model_flops(model: ModelConfig, seq_len: int, predicted: int | None = None) -> dict[str, Any]:
    """FLOPs per (input) token of one training step (forward + backward), two ways.

    ``flops_per_token = 6 * N + 12 * L * d * S`` with N the block matmul parameters
    (``L * (4 d^2 + 2 d F)``); ``flops_per_token_incl_head`` adds the LM-head matmul
    ``6 * d * V``, scaled by ``predicted / S`` when the head runs only at ``predicted``
    gathered positions per row (BERT MLM).
    """
    predicted = seq_len if predicted is None else predicted
    body = flops_per_token(model, seq_len, include_head=False)
    head = 6.0 * model.d_model * model.vocab_size * predicted / seq_len
    formula = "6*N + 12*L*d*S, N = L*(4*d^2 + 2*d*F)"  # the plain case's N; see perf.py
    if model.activation == "swiglu" or model.n_kv_heads not in (0, model.n_heads):
        formula = "6*N + 12*L*d*S, N = L*(2*d^2 + 2*d*d_kv + M*d*F), M = 3 gated else 2"
    if model.moe.num_experts:
        formula = (
            "6*N + 12*L*d*S, N = L*(2*d^2 + 2*d*d_kv) + dense layers*M*d*F "
            "+ MoE layers*(k*M*d*F + d*E) (active parameters: top-k experts + router)"
        )
    head_formula = "+ 6*d*V" if predicted == seq_len else f"+ 6*d*V * P/S (P={predicted})"
    return {
        "flops_per_token": body,
        "flops_per_token_incl_head": body + head,
        "flops_formula": formula,
        "flops_formula_incl_head": f"{formula} {head_formula}",
        "predicted_positions": predicted,
    }


def peak_warning(before: float, after: float, tolerance: float = PEAK_TOLERANCE) -> str | None:
    """A warning when the matmul peaks before and after differ by more than ``tolerance``
    of their mean (the machine's speed moved during the run), else None."""
    mean = (before + after) / 2
    if mean <= 0 or not math.isfinite(mean):
        return f"matmul peak not measurable (before {before:.3g}, after {after:.3g} FLOP/s)"
    gap = abs(before - after) / mean
    if gap <= tolerance:
        return None
    return (
        f"matmul peak moved by {100 * gap:.0f}% during the run ({before / 1e9:.0f} -> "
        f"{after / 1e9:.0f} GFLOP/s): noisy machine, treat the figures with care"
    )


def measure_peak(dtype: str = "float32", repeats: int = 7) -> float:
    """FLOP/s of jitted 2048x2048 matmuls in ``dtype`` (float32 accumulation) now: the best
    of ``repeats`` rounds, uncached (the before/after probes)."""
    return measure_matmul_peak(2048, repeats, dtype)


def peak_host_memory_mb() -> float:
    """The process's peak resident set (``getrusage`` maxrss; KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# --- the train step -------------------------------------------------------------------------


class TrainHarness:
    """The config's jitted train step on one synthetic batch, ready to time."""

    def __init__(self, cfg: Config):
        from flaxlm.train.batches import put_train_batch
        from flaxlm.train.program import TrainProgram
        from flaxlm.train.step import step_controls

        self.cfg, self.family = cfg, family_of(cfg)
        ms = TrainProgram.build(cfg, self.family)
        self.mesh, self.model, self.state_sh = ms.mesh, ms.model, ms.shardings
        self.state, self.step_fn = ms.fresh(), ms.train_step
        local = self.family.synthetic_batch(cfg, np.random.default_rng(cfg.train.seed))
        self.batch = put_train_batch(local, self.mesh, cfg.train.grad_accum)
        self.controls = step_controls()

    def step(self, number: int = 0) -> float:
        """Runs one step to completion; returns its wall time in seconds. ``number``: its
        step number in a trace (flaxlm/train/profiling.py names the train steps alike)."""
        t0 = time.perf_counter()
        with jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=number):
            self.state, metrics = self.step_fn(self.state, self.batch, self.controls)
            jax.block_until_ready(metrics)
        return time.perf_counter() - t0


def bench_train(
    cfg: Config,
    steps: int = 10,
    warmup: int = 3,
    harness: TrainHarness | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """Peak, compile, ``warmup`` steps, ``steps`` timed steps, peak. Returns the report dict
    (``step_s`` is the median step; MFU is against the mean of the two peaks). ``profile``: a
    folder for a ``jax.profiler`` trace of the timed steps (``*.xplane.pb``, for TensorBoard's
    profile plugin / XProf); their times then include the tracer's overhead."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps {steps} must be >= 1 and --warmup {warmup} >= 0")
    harness = harness or TrainHarness(cfg)
    peak_before = measure_peak(cfg.model.dtype)
    compile_s = harness.step(1)  # the first call compiles (and runs once)
    for i in range(warmup):
        harness.step(2 + i)
    with jax.profiler.trace(profile) if profile else contextlib.nullcontext():
        times = [harness.step(warmup + 2 + i) for i in range(steps)]
    peak_after = measure_peak(cfg.model.dtype)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    report = {"what": "train", "family": cfg.model.family, "tokens_per_step": tokens_per_step}
    report.update(
        step_s=statistics.median(times),
        step_s_min=min(times),
        compile_s=compile_s,
        steps=steps,
        warmup=warmup,
    )
    if profile:
        report["profile"] = str(profile)
    report["tokens_per_s"] = tokens_per_step / report["step_s"]
    predicted = harness.family.predicted_positions(cfg)
    report.update(model_flops(cfg.model, cfg.data.seq_len, predicted))
    report.update(family_flops_report(cfg))  # a family's own count (t5) replaces it
    stale = None
    if jax.devices()[0].platform == "cpu":  # a faster probe than the cached peak heals it
        stale = stale_cache_warning(
            run_peak(jax.devices(), cfg.model.dtype), peak_before, peak_after
        )
        raise_cpu_peak(cfg.model.dtype, max(peak_before, peak_after))
    peak = run_peak(jax.devices(), cfg.model.dtype)
    report.update(_against_peak(report, peak, peak_before, peak_after))
    if stale and "warning" not in report:
        report["warning"] = stale
    report["peak_host_memory_mb"] = peak_host_memory_mb()
    return report


def _against_peak(
    report: dict[str, Any], peak: Peak | None, before: float, after: float
) -> dict[str, Any]:
    """MFU against ``peak`` (None: an unknown chip, MFU left out as None) and against the
    mean of the same-run probes; the probes' gap warning."""
    probes = (before + after) / 2
    achieved = report["flops_per_token"] * report["tokens_per_s"]
    achieved_head = report["flops_per_token_incl_head"] * report["tokens_per_s"]
    total = peak.total if peak is not None else None
    out = {
        "peak_flops": total,
        "peak_origin": peak.origin if peak is not None else None,
        "peak_gflops": total / 1e9 if total else None,
        "peak_gflops_before": before / 1e9,
        "peak_gflops_after": after / 1e9,
        "model_gflops": achieved_head / 1e9,
        "mfu": achieved / total if total else None,
        "mfu_incl_head": achieved_head / total if total else None,
        "mfu_same_run": achieved / probes if probes > 0 else None,
    }
    warning = peak_warning(before, after) or stale_cache_warning(peak, before, after)
    if warning:
        out["warning"] = warning
    return out


def stale_cache_warning(peak: Peak | None, before: float, after: float) -> str | None:
    """A warning when this run's probes beat the cached CPU peak by over 10 %: the cache was
    measured on a busier machine, and every MFU against it reads high."""
    if peak is None or not peak.origin.startswith("measured:cpu"):
        return None
    if max(before, after) <= 1.1 * peak.flops:
        return None
    return (
        f"the cached CPU peak ({peak.flops / 1e9:.0f} GFLOP/s) is below this run's probes "
        f"({max(before, after) / 1e9:.0f}): it was measured on a busier machine; raised to "
        f"this run's best probe in {default_cache_path()}"
    )


def run_bench(
    cfg: Config,
    what: str = "train",
    steps: int = 10,
    warmup: int = 3,
    decode_batch: int = 1,
    profile: str | None = None,
) -> dict[str, Any]:
    """The benchmarks named by ``what`` (one of :data:`WHATS`); the train report at the top
    level, the others under ``data``, ``decode``, ``checkpoint`` (with ratios to the step)."""
    if what not in WHATS:
        raise ValueError(f"--what {what!r} is not one of {', '.join(WHATS)}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps {steps} must be >= 1 and --warmup {warmup} >= 0")
    if decode_batch < 1:
        raise ValueError(f"--decode-batch {decode_batch} must be >= 1")
    from flaxlm.tools import bench_phases as bench_io

    report: dict[str, Any] = {"jax": jax.__version__, "device": jax.devices()[0].device_kind}
    report["malloc_huge_pages"] = huge_pages_in_force()  # see flaxlm/runtime/host_memory.py
    step_rate, harness = None, None
    if what in ("train", "all", "data", "checkpoint"):
        harness = TrainHarness(cfg)
        report.update(bench_train(cfg, steps, warmup, harness, profile))
        step_rate = report["tokens_per_s"]
    if what in ("data", "all"):
        report["data"] = bench_io.bench_data(cfg, step_rate)
    if what in ("decode", "all"):
        report["decode"] = bench_io.bench_decode(cfg, batch=decode_batch)
    if what in ("checkpoint", "all"):
        report["checkpoint"] = bench_io.bench_checkpoint(harness, report["step_s"])
    report["peak_host_memory_mb"] = peak_host_memory_mb()
    warnings = [r["warning"] for r in (report, *report.values()) if _has_warning(r)]
    if warnings:
        report["warning"] = "; ".join(dict.fromkeys(warnings))
    return report


def _has_warning(r: Any) -> bool:
    return isinstance(r, dict) and bool(r.get("warning"))


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table ``flaxlm bench`` prints without ``--json``."""
    pages = "huge pages" if report.get("malloc_huge_pages") else "default pages"
    lines = [f"device               {report['device']} (jax {report['jax']}; malloc {pages})"]
    if "step_s" in report:
        lines += _train_lines(report)
    for name in ("data", "decode", "checkpoint"):
        if name in report:
            lines.append(f"{name:<21}{report[name]['summary']}")
    lines.append(f"peak host memory     {report['peak_host_memory_mb']:,.0f} MB")
    return "\n".join(lines)


def _train_lines(r: dict[str, Any]) -> list[str]:
    """The train step's rows of :func:`format_report`."""
    if r["peak_origin"] is None:
        peak = "none: no published peak for this device kind and dtype, MFU left out"
        mfu = "n/a"
    else:
        peak = f"{r['peak_gflops']:,.0f} GFLOP/s ({r['peak_origin']})"
        mfu = f"{100 * r['mfu']:.1f} %  (incl. head {100 * r['mfu_incl_head']:.1f} %)"
    same_run = r["mfu_same_run"]
    lines = [
        f"peak                 {peak}",
        f"probes               before {r['peak_gflops_before']:.0f}, after "
        f"{r['peak_gflops_after']:.0f} GFLOP/s (2048^2 matmul in the model's dtype, now)",
        f"compile              {r['compile_s']:.1f} s (first step, incl. one run)",
        f"step                 {r['step_s'] * 1e3:.1f} ms median of {r['steps']} "
        f"(min {r['step_s_min'] * 1e3:.1f} ms) after {r['warmup']} warm-up",
        f"tokens/s             {r['tokens_per_s']:,.0f} ({r['tokens_per_step']} per step)",
        f"FLOPs/token          {r['flops_per_token'] / 1e6:.1f} M = {r['flops_formula']}",
        f"  incl. head         {r['flops_per_token_incl_head'] / 1e6:.1f} M = "
        f"{r['flops_formula_incl_head']}",
        f"MFU                  {mfu}",
    ]
    if same_run is not None:
        lines.append(f"  vs the probes      {100 * same_run:.1f} % (their mean)")
    if r.get("profile"):
        lines.append(f"trace                {r['profile']} (the timed steps; tensorboard/xprof)")
    return lines
