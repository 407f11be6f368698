"""Model FLOPs per token and step, for MFU (model-FLOPs utilisation); the peak they are
divided by comes from :mod:`flaxlm.runtime.peaks`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flaxlm.config import Config, ModelConfig
from flaxlm.families import get_family
from flaxlm.models.flop_count import attention_params, mlp_params
from flaxlm.runtime.peaks import dtype_name, measure_cpu_peak, published_peak

DECODER_HOW = "6*N + 12*L*d*S per token"
FAMILY_HOW = "the family's own count per token"  # t5: encoder + decoder, per encoder token


def flops_per_token(cfg: ModelConfig, seq_len: int, include_head: bool = True) -> float:
    """Training FLOPs per token: ``6 * N + 12 * L * d * S`` (Kaplan et al. / PaLM appendix B).

    ``N`` counts the non-embedding matmul parameters of the blocks: attention ``2·d² + 2·d·d_kv``
    (queries and output, keys and values; ``d_kv = d · n_kv_heads / n_heads``, so 4·d² without
    GQA), MLP ``2·d·f`` (``3·d·f`` gated, swiglu) per layer; ``12·L·d·S`` is the attention score
    and value matmuls (forward + backward). ``include_head`` adds the LM-head matmul,
    ``6 * d * V``, which dominates small models.

    Mixture-of-Experts blocks count their *active* parameters: each token runs ``top_k`` of
    the ``E`` expert MLPs and the shared ones (``(top_k + shared) * M·d·F_e``) plus the router
    (``d·E``); tokens a capacity limit drops are still counted (an upper bound when
    ``capacity_factor`` > 0); :func:`flaxlm.models.flop_count.mlp_params`.
    """
    d, n_layers, gated = cfg.d_model, cfg.n_layers, cfg.activation == "swiglu"
    active_mlp = sum(mlp_params(cfg, i, gated) for i in range(n_layers))
    n_block = n_layers * attention_params(cfg) + active_mlp
    flops = 6.0 * n_block + 12.0 * n_layers * d * seq_len
    if include_head:
        flops += 6.0 * d * cfg.vocab_size
    return flops


def model_flops_per_token(cfg: Config, include_head: bool = True) -> float:
    """Training FLOPs per counted token (each of a row's ``data.seq_len`` positions, what
    tokens/s counts) of ``cfg``'s family: its own count where it has one
    (``Family.flop_count``: t5's encoder, decoder and cross-attention), else the decoder
    formula :func:`flops_per_token`. What the trainer's MFU, ``bench`` and ``plan`` use."""
    count = get_family(cfg.model.family).flop_count
    if count is None:
        return flops_per_token(cfg.model, cfg.data.seq_len, include_head)
    flops = count(cfg)
    return flops.body + flops.head if include_head else flops.body


def family_flops_report(cfg: Config) -> dict[str, Any]:
    """``flaxlm bench``'s FLOP fields (``flops_per_token``, ``..._incl_head``,
    ``flops_formula``, ``flops_formula_incl_head``) from the family's own count; empty for a
    family without one (bench's decoder formula stands)."""
    count = get_family(cfg.model.family).flop_count
    if count is None:
        return {}
    flops = count(cfg)
    return {
        "flops_per_token": flops.body,
        "flops_per_token_incl_head": flops.body + flops.head,
        "flops_formula": flops.formula,
        "flops_formula_incl_head": f"{flops.formula} {flops.head_formula}",
    }


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype: Any = "float32") -> float:
    """FLOP/s of the model's kind of ``n x n`` matmul in ``dtype`` on the default device, now
    (not cached): the best of ``repeats`` rounds (:func:`flaxlm.runtime.peaks.measure_cpu_peak`).
    ``flaxlm bench`` takes one before and one after its timed steps to see the machine move."""
    return measure_cpu_peak(dtype, n=n, rounds=repeats)


def plan_mfu_fields(
    cfg: Config, report: dict[str, Any], step_times: Sequence[float] = ()
) -> dict[str, Any]:
    """What a compiled target's step would mean in MFU (``flaxlm plan --target``), from the
    plan ``report`` of a TPU or GPU target (its ``device_kind`` picks the row of the published
    table; ``devices`` / ``devices_per_chip`` give the chips: v4 topologies have two devices
    per chip).

    ``model_flops_per_step`` (:func:`model_flops_per_token`, head included, times the global
    batch's tokens), ``peak_flops_per_device`` and ``peak_origin`` (the published per-chip peak in
    ``model.dtype``; None, with a ``peak_unknown`` sentence, where the table has none),
    ``chips``, ``step_s_at_full_peak`` (the step time at 100 % MFU) and ``mfu_at_step_s``
    (``{step time: MFU}`` for each of ``step_times``)."""
    device_kind = report["device_kind"]
    n_chips = max(report["devices"] // report.get("devices_per_chip", 1), 1)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    step_flops = model_flops_per_token(cfg) * tokens
    peak = published_peak(device_kind, cfg.model.dtype)  # None: said in the report, no warning
    out: dict[str, Any] = {
        "model_flops_per_step": step_flops,
        "flops_how": FAMILY_HOW if get_family(cfg.model.family).flop_count else DECODER_HOW,
        "peak_flops_per_device": None if peak is None else peak.flops,
        "peak_origin": None if peak is None else peak.origin,
        "chips": n_chips,
        "step_s_at_full_peak": None if peak is None else step_flops / (peak.flops * n_chips),
    }
    if peak is None:
        out["peak_unknown"] = (
            f"no published {dtype_name(cfg.model.dtype)} peak for {device_kind}: no MFU"
        )
    if step_times:
        out["mfu_at_step_s"] = {
            f"{t:g}": None if peak is None else step_flops / t / (peak.flops * n_chips)
            for t in step_times
        }
    return out


def format_plan_mfu(report: dict[str, Any]) -> list[str]:
    """``flaxlm plan``'s rows for :func:`plan_mfu_fields` (none without a target)."""
    if "model_flops_per_step" not in report:
        return []
    flops = report["model_flops_per_step"]
    if report["peak_origin"] is None:
        return [f"  model FLOPs/step    {flops:.4g}; {report['peak_unknown']}"]
    lines = [
        f"  model FLOPs/step    {flops:.4g} ({report.get('flops_how', DECODER_HOW)}, head "
        "included)",
        f"  peak                {report['peak_flops_per_device'] / 1e12:,.1f} TFLOP/s per chip "
        f"({report['peak_origin']}) x {report['chips']} chips",
        f"  step at 100% MFU    {report['step_s_at_full_peak']:.4g} s",
    ]
    for step_s, mfu in report.get("mfu_at_step_s", {}).items():
        lines.append(f"  MFU at {step_s} s step  {100 * mfu:.3g} %")
    return lines
