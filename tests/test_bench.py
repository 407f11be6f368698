"""The benchmark harness: its FLOP formula, its report and its noisy-peak warning.

No timing assertions: the figures depend on the machine; only the harness is checked."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from flaxlm.cli import main
from flaxlm.config import load_config
from flaxlm.tools.bench import model_flops, peak_warning, predicted_positions


def test_flop_formula_of_gpt_small_cpu_by_hand():
    cfg = load_config(REPO / "configs/bench/gpt_small_cpu.yaml", check_paths=False)
    d, f, n_layers, seq, vocab = 384, 1536, 6, 256, 8192
    block_params = n_layers * (4 * d * d + 2 * d * f)  # q, k, v, out + MLP up, down
    assert block_params == 10_616_832
    body = 6 * block_params + 12 * n_layers * d * seq  # 63,700,992 + 7,077,888
    flops = model_flops(cfg.model, cfg.data.seq_len, predicted_positions(cfg))
    assert flops["flops_per_token"] == body == 70_778_880
    assert flops["flops_per_token_incl_head"] == body + 6 * d * vocab == 89_653_248
    assert "6*N + 12*L*d*S" in flops["flops_formula"]
    assert flops["flops_formula_incl_head"].endswith("+ 6*d*V")


def test_bert_head_flops_count_only_the_gathered_positions():
    cfg = load_config(REPO / "configs/bench/bert_small_cpu.yaml", check_paths=False)
    assert predicted_positions(cfg) == 20  # ceil(0.15 * 128)
    flops = model_flops(cfg.model, cfg.data.seq_len, predicted_positions(cfg))
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


@pytest.mark.parametrize("config", ["configs/gpt_tiny.yaml", "configs/bert_tiny.yaml"])
def test_bench_json_has_the_promised_fields(capsys, config):
    code = main(["bench", str(REPO / config), *TINY, "--json", "--steps", "2", "--warmup", "1"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    report = json.loads(out[0])
    for key in ("tokens_per_s", "step_s", "peak_gflops", "mfu", "mfu_incl_head", "compile_s",
                "peak_gflops_before", "peak_gflops_after", "flops_per_token",
                "flops_per_token_incl_head", "flops_formula", "peak_host_memory_mb",
                "malloc_huge_pages"):  # fmt: skip
        assert key in report, key
    assert report["tokens_per_s"] > 0 and report["peak_gflops"] > 0
    assert 0 < report["mfu"] <= report["mfu_incl_head"]
    assert ("warning" in report) == (
        peak_warning(report["peak_gflops_before"], report["peak_gflops_after"]) is not None
    )


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
