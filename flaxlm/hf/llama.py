"""A Llama-style GPT (``model.norm: rmsnorm``, ``activation: swiglu``, ``positions: rope``,
``use_bias: false``, any ``n_kv_heads``) <-> HuggingFace ``LlamaForCausalLM``; with
``model.moe`` (dropless, in every block) <-> ``MixtralForCausalLM``.

Mixtral's checkpoints hold the router as ``block_sparse_moe.gate.weight (E, D)`` and expert e
as ``block_sparse_moe.experts.e.{w1 (gate), w3 (up)} (F, D)`` and ``w2 (down) (D, F)``: what
``to-hf`` writes and ``from-hf`` reads (also transformers 5's in-memory names,
``mlp.gate.weight`` and the stacked ``mlp.experts.gate_up_proj`` / ``down_proj``). Both sides
softmax the router logits, take the top k and renormalise them. HF has no capacity limit
and no MoE-every-n-th-block: those are refused. The router z-loss weight, which HF does not
train with, is kept in ``flaxlm_model``.

HF's Linear weights are ``(out, in)``, ours ``(in, ...)``: every kernel is transposed. Both
rotate "half" (features i and i + K/2 pair up) with the same frequencies, so queries and keys
need no permutation. Refused, with the option named: LayerNorm, other activations, learned
or sinusoidal positions, biases.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flaxlm.config import ModelConfig, MoEConfig
from flaxlm.hf.base import (
    ConversionError,
    Converter,
    float32_numpy,
    refuse_unsupported,
    restore_saved_config,
    tensor_getter,
)
from flaxlm.tokenizers.sentencepiece import BOS_ID, EOS_ID, PAD_ID

# What makes a GPT config Llama-shaped: the values LlamaForCausalLM computes with.
LLAMA_OPTIONS = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "use_bias": False}


def is_llama(cfg: ModelConfig) -> bool:
    """A GPT config that asks for Llama's norm or MLP: exported as Llama (or refused)."""
    return cfg.norm == "rmsnorm" or cfg.activation == "swiglu"


def is_mixtral(cfg: ModelConfig) -> bool:
    return is_llama(cfg) and cfg.moe.num_experts > 0


def llama_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of a ``LlamaForCausalLM`` (or, with MoE, ``MixtralForCausalLM``)
    equal to ``GPT(cfg)``."""
    arch = "Mixtral" if is_mixtral(cfg) else "Llama"
    for option, needed in LLAMA_OPTIONS.items():
        if getattr(cfg, option) != needed:
            raise ConversionError(
                f"model.{option}={getattr(cfg, option)!r} cannot be expressed by {arch} "
                f"(needs {needed!r})"
            )
    moe = {}
    if is_mixtral(cfg):
        for option, needed in (("capacity_factor", 0.0), ("every", 1)):
            if getattr(cfg.moe, option) != needed:
                raise ConversionError(
                    f"model.moe.{option}={getattr(cfg.moe, option)!r} cannot be expressed by "
                    f"Mixtral (needs {needed!r})"
                )
        moe = {
            "num_local_experts": cfg.moe.num_experts,
            "num_experts_per_tok": cfg.moe.top_k,
            "router_aux_loss_coef": cfg.moe.load_balance_loss,
            "router_jitter_noise": 0.0,
        }
    return {
        "architectures": [f"{arch}ForCausalLM"],
        "model_type": arch.lower(),
        **moe,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "dtype": "float32",
        "flaxlm_model": dataclasses.asdict(cfg),
    }


def llama_model_config(hf: dict[str, Any]) -> ModelConfig:
    """The flaxlm ModelConfig of a Llama ``config.json``; refuses what GPT cannot express."""
    rope = hf.get("rope_parameters") or {}
    refuse_unsupported(
        {
            "hidden_act": (hf.get("hidden_act"), "silu"),
            "attention_bias": (hf.get("attention_bias"), False),
            "mlp_bias": (hf.get("mlp_bias"), False),
            "rope_type": (
                rope.get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type")),
                "default",
            ),  # fmt: skip
        }
    )
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise ConversionError(
            f"head_dim={hf['head_dim']} is not supported (flaxlm needs hidden_size / "
            f"num_attention_heads = {hf['hidden_size'] // heads})"
        )
    moe = MoEConfig()
    if hf.get("model_type") == "mixtral":
        refuse_unsupported({"router_jitter_noise": (hf.get("router_jitter_noise"), 0.0)})
        moe = MoEConfig(
            num_experts=hf["num_local_experts"],
            top_k=hf.get("num_experts_per_tok", 2),
            load_balance_loss=hf.get("router_aux_loss_coef", 0.02),
        )
    cfg = ModelConfig(
        family="gpt",
        moe=moe,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        positions="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        activation="swiglu",
        norm="rmsnorm",
        tie_embeddings=hf.get("tie_word_embeddings", False),
        use_bias=False,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
    )
    return restore_saved_config(cfg, hf, llama_config)


def llama_tensors(params: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """GPT params -> Llama state dict (float32)."""
    llama_config(cfg)  # refuses what cannot be expressed
    p = float32_numpy(params)
    d = cfg.d_model
    out = {"model.embed_tokens.weight": p["token_embed"]["embedding"]}
    for i in range(cfg.n_layers):
        b, h = p[f"blocks_{i}"], f"model.layers.{i}"
        attn, mlp = b["attn"], b["mlp"]
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out[f"{h}.self_attn.{theirs}.weight"] = attn[ours]["kernel"].reshape(d, -1).T
        out[f"{h}.self_attn.o_proj.weight"] = attn["out"]["kernel"].reshape(-1, d).T
        if "router" in mlp:  # Mixtral
            moe = f"{h}.block_sparse_moe"
            out[f"{moe}.gate.weight"] = mlp["router"].T
            for e in range(cfg.moe.num_experts):
                out[f"{moe}.experts.{e}.w1.weight"] = mlp["gate"][e].T
                out[f"{moe}.experts.{e}.w3.weight"] = mlp["up"][e].T
                out[f"{moe}.experts.{e}.w2.weight"] = mlp["down"][e].T
        else:
            for name in ("gate", "up", "down"):
                out[f"{h}.mlp.{name}_proj.weight"] = mlp[name]["kernel"].T
        out[f"{h}.input_layernorm.weight"] = b["ln_attn"]["scale"]
        out[f"{h}.post_attention_layernorm.weight"] = b["ln_mlp"]["scale"]
    out["model.norm.weight"] = p["ln_final"]["scale"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"]["kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def llama_params(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """Llama state dict -> GPT params."""
    t = {k.removeprefix("model."): np.asarray(v, np.float32) for k, v in tensors.items()}
    take = tensor_getter(t, "MixtralForCausalLM" if cfg.moe.num_experts else "LlamaForCausalLM")
    d, heads = cfg.d_model, cfg.n_heads
    k, kv_heads = d // heads, cfg.n_kv_heads or heads
    params: dict[str, Any] = {"token_embed": {"embedding": take("embed_tokens.weight")}}
    for i in range(cfg.n_layers):
        h = f"layers.{i}"

        def proj(name: str, n: int, h: str = h) -> dict[str, np.ndarray]:
            return {"kernel": take(f"{h}.self_attn.{name}.weight").T.reshape(d, n, k)}

        params[f"blocks_{i}"] = {
            "attn": {
                "query": proj("q_proj", heads),
                "key": proj("k_proj", kv_heads),
                "value": proj("v_proj", kv_heads),
                "out": {"kernel": take(f"{h}.self_attn.o_proj.weight").T.reshape(heads, k, d)},
            },
            "mlp": _mlp_params(take, t, h, cfg),
            "ln_attn": {"scale": take(f"{h}.input_layernorm.weight")},
            "ln_mlp": {"scale": take(f"{h}.post_attention_layernorm.weight")},
        }
    params["ln_final"] = {"scale": take("norm.weight")}
    if not cfg.tie_embeddings:
        head = tensors.get("lm_head.weight")
        if head is None:
            raise ConversionError("tie_word_embeddings=false but the weights lack lm_head.weight")
        params["lm_head"] = {"kernel": np.asarray(head, np.float32).T}
    return params


def _mlp_params(take, names, h: str, cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.moe.num_experts:
        return {n: {"kernel": take(f"{h}.mlp.{n}_proj.weight").T} for n in ("gate", "up", "down")}
    if f"{h}.mlp.gate.weight" in names:  # transformers 5's stacked names
        gate_up = take(f"{h}.mlp.experts.gate_up_proj").transpose(0, 2, 1)  # (E, D, 2F)
        return {
            "router": take(f"{h}.mlp.gate.weight").T,
            "gate": gate_up[:, :, : cfg.d_ff],
            "up": gate_up[:, :, cfg.d_ff :],
            "down": take(f"{h}.mlp.experts.down_proj").transpose(0, 2, 1),
        }
    moe, experts = f"{h}.block_sparse_moe", range(cfg.moe.num_experts)

    def stacked(w: str) -> np.ndarray:
        return np.stack([take(f"{moe}.experts.{e}.{w}.weight").T for e in experts])

    return {
        "router": take(f"{moe}.gate.weight").T,
        "gate": stacked("w1"),
        "up": stacked("w3"),
        "down": stacked("w2"),
    }


LLAMA = Converter(
    hf_model_type="llama",
    to_config=llama_config,
    from_config=llama_model_config,
    to_tensors=llama_tensors,
    from_tensors=llama_params,
    accepts=is_llama,
)
# The same functions: they tell Llama and Mixtral apart by model.moe / model_type.
MIXTRAL = dataclasses.replace(LLAMA, hf_model_type="mixtral", accepts=is_mixtral)
