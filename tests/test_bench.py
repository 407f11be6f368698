"""The benchmark harness: its FLOP formula, its report and its noisy-peak warning.

No timing assertions: the figures depend on the machine; only the harness is checked."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from flaxlm.cli import main
from flaxlm.config import load_config
from flaxlm.families import get_family
from flaxlm.runtime.peaks import Peak
from flaxlm.tools.bench import model_flops, peak_warning


def test_flop_formula_of_gpt_small_cpu_by_hand():
    cfg = load_config(REPO / "configs/bench/gpt_small_cpu.yaml", check_paths=False)
    d, f, n_layers, seq, vocab = 384, 1536, 6, 256, 8192
    block_params = n_layers * (4 * d * d + 2 * d * f)  # q, k, v, out + MLP up, down
    assert block_params == 10_616_832
    body = 6 * block_params + 12 * n_layers * d * seq  # 63,700,992 + 7,077,888
    flops = model_flops(
        cfg.model, cfg.data.seq_len, get_family(cfg.model.family).predicted_positions(cfg)
    )
    assert flops["flops_per_token"] == body == 70_778_880
    assert flops["flops_per_token_incl_head"] == body + 6 * d * vocab == 89_653_248
    assert "6*N + 12*L*d*S" in flops["flops_formula"]
    assert flops["flops_formula_incl_head"].endswith("+ 6*d*V")


def test_bert_head_flops_count_only_the_gathered_positions():
    cfg = load_config(REPO / "configs/bench/bert_small_cpu.yaml", check_paths=False)
    assert get_family(cfg.model.family).predicted_positions(cfg) == 20  # ceil(0.15 * 128)
    flops = model_flops(
        cfg.model, cfg.data.seq_len, get_family(cfg.model.family).predicted_positions(cfg)
    )
    d, vocab, seq = 384, 8192, 128
    body = 6 * 6 * (4 * d * d + 2 * d * 1536) + 12 * 6 * d * seq
    assert flops["flops_per_token"] == body
    assert flops["flops_per_token_incl_head"] == pytest.approx(body + 6 * d * vocab * 20 / seq)
    assert "P/S (P=20)" in flops["flops_formula_incl_head"]


@pytest.mark.parametrize(
    ("before", "after", "warns"),
    [(400e9, 390e9, False), (400e9, 330e9, False), (400e9, 300e9, True), (150e9, 400e9, True)],
)
def test_noisy_peak_warning(before, after, warns):
    warning = peak_warning(before, after)
    assert (warning is not None) == warns
    if warns:
        assert "noisy machine" in warning


def test_peak_warning_threshold_is_relative_to_the_mean():
    assert peak_warning(100.0, 122.0) is None  # 19.8 % of the mean 111
    assert peak_warning(100.0, 123.0) is not None  # 20.6 %
    assert peak_warning(0.0, 0.0) is not None


TINY = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64",
    "model.vocab_size=128", "model.max_seq_len=16", "data.seq_len=16", "train.batch_size=2",
]  # fmt: skip


# TINY by hand: d = 32, F = 64, one layer, S = 16, V = 128, 2 rows of 16 tokens per step.
TINY_BODY_FLOPS = 6 * (4 * 32 * 32 + 2 * 32 * 64) + 12 * 1 * 32 * 16  # 55,296 per token
TINY_HEAD_FLOPS = {"gpt": 6 * 32 * 128, "bert": 6 * 32 * 128 * 3 / 16}  # BERT: 3 = ceil(.15 * 16)


@pytest.mark.parametrize(
    ("config", "peaks", "warns"),
    [
        ("configs/gpt_tiny.yaml", (100e9, 130e9), True),  # 30 apart, 26 % of the mean 115
        ("configs/bert_tiny.yaml", (100e9, 105e9), False),  # 5 apart, 4.9 % of 102.5
    ],
)
def test_bench_json_rates_against_peak_and_probes(capsys, monkeypatch, config, peaks, warns):
    """The peaks are pinned to known values, so the MFU, the FLOPs and the warning can be
    checked against hand-computed figures (only the step time is the machine's)."""
    from flaxlm.tools import bench

    measured = iter(peaks)  # before, after; a third measurement would raise
    monkeypatch.setattr(bench, "measure_peak", lambda *args, **kwargs: next(measured))
    used = Peak(120e9, "measured:cpu:fp32")  # the peak training would use (cache / table)
    monkeypatch.setattr(bench, "run_peak", lambda devices, dtype: used)
    code = main(["bench", str(REPO / config), *TINY, "--json", "--steps", "2", "--warmup", "1"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    report = json.loads(out[0])
    family = "bert" if "bert" in config else "gpt"
    probes = (peaks[0] + peaks[1]) / 2
    assert (report["peak_gflops_before"], report["peak_gflops_after"]) == (100, peaks[1] / 1e9)
    assert (report["peak_flops"], report["peak_origin"]) == (120e9, "measured:cpu:fp32")
    assert report["peak_gflops"] == pytest.approx(120)
    peak = used.total
    assert report["flops_per_token"] == TINY_BODY_FLOPS == 55_296
    with_head = TINY_BODY_FLOPS + TINY_HEAD_FLOPS[family]
    assert report["flops_per_token_incl_head"] == pytest.approx(with_head)
    assert report["steps"] == 2 and report["step_s_min"] <= report["step_s"]
    assert report["tokens_per_s"] == pytest.approx(2 * 16 / report["step_s"])
    assert report["mfu"] == pytest.approx(TINY_BODY_FLOPS * report["tokens_per_s"] / peak)
    assert report["mfu_incl_head"] == pytest.approx(with_head * report["tokens_per_s"] / peak)
    same_run = TINY_BODY_FLOPS * report["tokens_per_s"] / probes
    assert report["mfu_same_run"] == pytest.approx(same_run)
    assert report["compile_s"] > 0 and report["peak_host_memory_mb"] > 100
    assert isinstance(report["malloc_huge_pages"], bool)
    assert ("warning" in report) == warns
    if warns:
        assert "moved by 26%" in report["warning"] and "noisy machine" in report["warning"]


def test_bench_decode_compares_cache_and_recompute(capsys):
    code = main(["bench", str(REPO / "configs/gpt_tiny.yaml"), *TINY, "--what", "decode",
                 "--json"])  # fmt: skip
    assert code == 0
    decode = json.loads(capsys.readouterr().out)["decode"]
    assert decode["same_tokens"] is True
    assert decode["context"] == 16 and decode["new_tokens"] == 8
    assert decode["kv_tokens_per_s"] > 0 and decode["speedup"] > 0


def test_bench_rejects_a_bad_step_count(capsys):
    assert main(["bench", str(REPO / "configs/gpt_tiny.yaml"), *TINY, "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err


def test_moe_gqa_and_gated_mlp_flops_count_active_parameters():
    """Per layer: q and o (2 d^2), k and v at the key/value width (2 d d_kv), the gated MLP's
    three matrices, and for MoE only the top-k experts plus the router."""
    from flaxlm.config import ModelConfig, MoEConfig
    from flaxlm.train.flops import flops_per_token

    d, f, n_layers, seq = 64, 96, 2, 32
    llama = ModelConfig(d_model=d, d_ff=f, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                        activation="swiglu")  # fmt: skip
    attn = 2 * d * d + 2 * d * (d // 2)
    assert (
        flops_per_token(llama, seq, False)
        == 6 * n_layers * (attn + 3 * d * f) + 12 * n_layers * d * seq
    )
    moe = ModelConfig(**{**llama.__dict__, "moe": MoEConfig(num_experts=8, top_k=2, every=2)})
    active = attn * n_layers + 3 * d * f + (2 * 3 * d * f + d * 8)  # block 0 dense, block 1 MoE
    assert flops_per_token(moe, seq, False) == 6 * active + 12 * n_layers * d * seq
    assert "MoE layers*(k*M*d*F + d*E)" in model_flops(moe, seq)["flops_formula"]


def test_bench_text_names_the_peak_and_keeps_the_formula():
    from flaxlm.tools.bench import format_report

    report = {
        "device": "cpu", "jax": "0", "peak_host_memory_mb": 1.0, "step_s": 0.1,
        "step_s_min": 0.1, "steps": 2, "warmup": 1, "compile_s": 1.0, "tokens_per_s": 320.0,
        "tokens_per_step": 32, "peak_gflops": 120.0, "peak_origin": "measured:cpu:fp32",
        "peak_gflops_before": 100.0, "peak_gflops_after": 130.0, "mfu": 0.25,
        "mfu_incl_head": 0.3, "mfu_same_run": 0.26, "flops_per_token": 55296.0,
        "flops_per_token_incl_head": 80000.0, "flops_formula": "6*N + 12*L*d*S",
        "flops_formula_incl_head": "6*N + 12*L*d*S + 6*d*V",
    }  # fmt: skip
    text = format_report(report)
    assert "120 GFLOP/s (measured:cpu:fp32)" in text and "before 100, after 130" in text
    assert "= 6*N + 12*L*d*S" in text and "25.0 %" in text
    unknown = format_report({**report, "peak_origin": None, "mfu": None, "mfu_incl_head": None})
    assert "MFU left out" in unknown and "n/a" in unknown


def test_a_cached_cpu_peak_below_the_probes_is_flagged():
    from flaxlm.tools.bench import stale_cache_warning

    cached = Peak(100e9, "measured:cpu:fp32")
    assert stale_cache_warning(cached, 105e9, 108e9) is None  # within 10 %
    assert "busier machine" in stale_cache_warning(cached, 105e9, 130e9)
    assert stale_cache_warning(Peak(197e12, "published:TPU v5 lite:bf16", 4), 1e15, 1e15) is None
