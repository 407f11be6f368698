"""HuggingFace interop for Llama-style GPTs: flaxlm GPT (RMSNorm, SwiGLU, RoPE, GQA, no biases)
<-> transformers LlamaForCausalLM, logits equal in fp32 (max |diff| <= 1e-4)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import noisy_params

from flaxlm.config import ModelConfig, MoEConfig
from flaxlm.models import GPT
from flaxlm.tools.convert import ConversionError, export_hf, import_hf

HF_MISSING = "the hf extra is not installed: pip install -e '.[hf]' (make install-dev does)"
torch = pytest.importorskip("torch", reason=HF_MISSING)
transformers = pytest.importorskip("transformers", reason=HF_MISSING)

V = 96
LLAMA = dict(norm="rmsnorm", activation="swiglu", positions="rope", use_bias=False,
             tie_embeddings=False, norm_eps=1e-6)  # fmt: skip


def tiny(**overrides) -> ModelConfig:
    base = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=72, max_seq_len=40,
                       **LLAMA)  # fmt: skip
    return dataclasses.replace(base, **overrides)


def tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (2, 40))


def torch_logits(model, t: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(t)).logits.numpy()


def flax_logits(cfg, params, t: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(GPT(cfg).apply)({"params": params}, jnp.asarray(t)))


def check_export_and_back(cfg: ModelConfig, hf_class, tmp_path) -> None:
    """Export noisy params: ``hf_class`` gives the same logits (fp32, 1e-4), and importing the
    directory gives back the same config and bit-identical params."""
    params = noisy_params(cfg)
    export_hf(cfg, params, tmp_path)
    hf = hf_class.from_pretrained(tmp_path).eval()
    diff = np.abs(torch_logits(hf, tokens()) - flax_logits(cfg, params, tokens())).max()
    assert diff <= 1e-4, f"max abs diff {diff}"
    back_cfg, back = import_hf(tmp_path)
    assert back_cfg == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


EXPORTABLE = {
    "gqa": {"n_kv_heads": 2},
    "mqa-tied": {"n_kv_heads": 1, "tie_embeddings": True},
    "mha-theta": {"rope_theta": 500000.0},
    "scanned": {"n_kv_heads": 2, "scan_layers": True},
}


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_gives_transformers_llama_the_same_logits_and_imports_back(name, tmp_path):
    cfg = tiny(**EXPORTABLE[name])
    check_export_and_back(cfg, transformers.LlamaForCausalLM, tmp_path)


def test_a_random_transformers_llama_imports_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1: make them matter
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    cfg, params = import_hf(tmp_path)
    assert (cfg.n_kv_heads, cfg.norm, cfg.activation, cfg.tie_embeddings) == (
        2, "rmsnorm", "swiglu", False,
    )  # fmt: skip
    diff = np.abs(torch_logits(hf, tokens(1)) - flax_logits(cfg, params, tokens(1))).max()
    assert diff <= 1e-4, f"max abs diff {diff}"


@pytest.mark.parametrize(
    "overrides,named",
    [
        ({"positions": "learned"}, "model.positions='learned' cannot be expressed by Llama"),
        ({"use_bias": True}, "model.use_bias=True cannot be expressed by Llama"),
        ({"norm": "layernorm"}, "model.norm='layernorm' cannot be expressed by Llama"),
        ({**{k: getattr(ModelConfig(), k) for k in LLAMA}, "norm": "rmsnorm"},
         "model.activation='gelu' cannot be expressed by Llama"),
    ],
)  # fmt: skip
def test_what_llama_cannot_express_is_refused_with_the_option_named(overrides, named, tmp_path):
    cfg = tiny(**overrides)
    with pytest.raises(ConversionError, match=named):
        export_hf(cfg, noisy_params(cfg), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_an_moe_llama_exports_as_mixtral_with_the_same_logits_and_back(tmp_path):
    cfg = tiny(n_kv_heads=2, moe=MoEConfig(num_experts=4, top_k=2))
    check_export_and_back(cfg, transformers.MixtralForCausalLM, tmp_path)


def test_a_random_transformers_mixtral_imports_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    hf = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    cfg, params = import_hf(tmp_path)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.capacity_factor) == (4, 2, 0.0)
    diff = np.abs(torch_logits(hf, tokens(1)) - flax_logits(cfg, params, tokens(1))).max()
    assert diff <= 1e-4, f"max abs diff {diff}"


@pytest.mark.parametrize(
    "moe,named",
    [
        (MoEConfig(num_experts=4, capacity_factor=1.0), "model.moe.capacity_factor=1.0"),
        (MoEConfig(num_experts=4, every=2), "model.moe.every=2"),
    ],
)
def test_what_mixtral_cannot_express_is_refused(moe, named, tmp_path):
    cfg = tiny(moe=moe)
    with pytest.raises(ConversionError, match=f"{named} cannot be expressed by Mixtral"):
        export_hf(cfg, noisy_params(cfg), tmp_path / "refused")
