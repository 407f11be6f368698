"""The t5 family's FLOP count (``Family.flop_count``, flaxlm/families/t5.py) against a hand
count: every matmul of one training example listed from the config's shapes, 2 FLOPs per
multiply-add, forward + backward = 3 x forward, divided by the encoder tokens the trainer
counts; and what the trainer, ``plan`` and ``bench`` take from it."""

from __future__ import annotations

import pytest
from conftest import REPO

from flaxlm.config import load_config
from flaxlm.data.span_corruption import resolve_target_len
from flaxlm.train.flops import (
    family_flops_report,
    flops_per_token,
    format_plan_mfu,
    model_flops_per_token,
    plan_mfu_fields,
)


def hand_count(cfg) -> tuple[float, float]:
    """(body, head) training FLOPs per encoder token of one example, matmul by matmul."""
    m = cfg.model
    d, f, heads = m.d_model, m.d_ff, m.n_heads
    d_kv = (m.n_kv_heads or heads) * (d // heads)
    S, T = cfg.data.seq_len, resolve_target_len(cfg)  # the config's encoder, decoder lengths
    n_dec = m.t5.decoder_layers or m.n_layers
    matmuls = []  # (rows, inner, cols): a (rows x inner) @ (inner x cols) product

    def mlp(tokens: int, layer: int) -> list[tuple[int, int, int]]:
        moe = m.moe
        if moe.num_experts and (layer + 1) % moe.every == 0:  # routed: top-k ungated experts
            width = moe.d_expert or f
            out = [(tokens, d, moe.num_experts)]  # the router
            for _ in range(moe.top_k + moe.shared_experts):
                out += [(tokens, d, width), (tokens, width, d)]
            return out
        ups = 2 if m.t5.gated_mlp else 1
        return [(tokens, d, f)] * ups + [(tokens, f, d)]

    for layer in range(m.n_layers):  # encoder
        matmuls += [(S, d, d), (S, d, d_kv), (S, d, d_kv), (S, d, d)]  # q, k, v, out
        matmuls += [(S, d, S), (S, S, d)]  # scores q k^T and their values, all heads
        matmuls += mlp(S, layer)
    for layer in range(n_dec):  # decoder
        matmuls += [(T, d, d), (T, d, d_kv), (T, d, d_kv), (T, d, d)]  # self-attention
        matmuls += [(T, d, T), (T, T, d)]
        matmuls += [(T, d, d), (S, d, d_kv), (S, d, d_kv), (T, d, d)]  # cross: k, v of encoder
        matmuls += [(T, d, S), (T, S, d)]
        matmuls += mlp(T, layer)
    body = sum(3 * 2 * r * i * c for r, i, c in matmuls)
    head = 3 * 2 * T * d * m.vocab_size
    return body / S, head / S


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("t5_demo.yaml", []),
        ("t5_base.yaml", []),
        (
            "t5_tiny.yaml",
            [
                "model.t5.gated_mlp=false",
                "model.t5.decoder_layers=3",
                "model.moe.num_experts=4",
                "model.moe.top_k=2",
                "model.moe.every=2",
                "model.n_kv_heads=2",
            ],
        ),
    ],  # fmt: skip
)
def test_t5_flops_equal_a_matmul_by_matmul_count(config, overrides):
    cfg = load_config(REPO / "configs" / config, overrides, check_paths=False)
    body, head = hand_count(cfg)
    assert model_flops_per_token(cfg, include_head=False) == pytest.approx(body, rel=1e-12)
    assert model_flops_per_token(cfg) == pytest.approx(body + head, rel=1e-12)
    # not the decoder formula over the encoder length, which has no decoder at all
    assert model_flops_per_token(cfg) != pytest.approx(flops_per_token(cfg.model, cfg.data.seq_len))
    report = family_flops_report(cfg)  # what flaxlm bench prints
    assert report["flops_per_token"] == pytest.approx(body, rel=1e-12)
    assert report["flops_per_token_incl_head"] == pytest.approx(body + head, rel=1e-12)
    assert report["flops_formula"].endswith("M = MLP (3*d*F gated, else 2*d*F)")
    lengths = f"(S={cfg.data.seq_len}, T={resolve_target_len(cfg)})"
    assert report["flops_formula_incl_head"].endswith(f"+ 6*d*V * T/S {lengths}")


def test_plan_counts_the_t5_step_with_the_family_count():
    cfg = load_config(REPO / "configs" / "t5_demo.yaml", ["model.dtype=bfloat16"], False)
    report = {"device_kind": "TPU v5p", "devices": 4}
    fields = plan_mfu_fields(cfg, report, (1.0,))
    tokens = cfg.train.batch_size * cfg.data.seq_len
    assert fields["model_flops_per_step"] == pytest.approx(sum(hand_count(cfg)) * tokens)
    assert "the family's own count per token" in format_plan_mfu(fields)[0]
