"""flaxlm GPT <-> transformers ``GPT2LMHeadModel``: ``config.json`` fields and tensor names.

A flaxlm GPT maps exactly onto GPT-2: pre-LN blocks, biases, learned positions, ``gelu``
(tanh) = ``gelu_new``, tied or untied head. What GPT-2 cannot express (rotary positions) is
refused with the option named; what it can express another way is written that way
(sinusoidal positions as a fixed position table; no biases as zero biases). GPT-2's Conv1D
weights are ``(in, out)``, as our kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flaxlm.config import ModelConfig
from flaxlm.hf.base import (
    FROM_HF_ACTIVATIONS,
    TO_HF_ACTIVATIONS,
    ConversionError,
    Converter,
    as_params,
    bias_or_zeros,
    float32_numpy,
    hf_activation,
    refuse_options,
    refuse_unsupported,
    restore_saved_config,
    sinusoidal_table,
    tensor_getter,
)
from flaxlm.tokenizers.sentencepiece import BOS_ID, EOS_ID, PAD_ID

GPT2_ACTIVATIONS = TO_HF_ACTIVATIONS
FROM_GPT2_ACTIVATIONS = FROM_HF_ACTIVATIONS


def gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of a ``GPT2LMHeadModel`` equal to ``GPT(cfg)``; refuses options
    GPT-2 cannot express."""
    if cfg.n_kv_heads not in (0, cfg.n_heads):
        raise ConversionError(
            f"model.n_kv_heads={cfg.n_kv_heads} (grouped-query attention) cannot be expressed "
            f"by GPT-2, whose key/value heads equal its n_heads={cfg.n_heads}"
        )
    refuse_options(cfg, "GPT-2", {"norm": ("layernorm",), "activation": tuple(GPT2_ACTIVATIONS)})
    if cfg.positions == "rope":
        raise ConversionError(
            "model.positions='rope' cannot be expressed by GPT-2 (learned absolute positions)"
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "activation_function": GPT2_ACTIVATIONS[cfg.activation],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": BOS_ID,  # flaxlm.tokenizers.sentencepiece's fixed special ids
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "dtype": "float32",
        "flaxlm_model": dataclasses.asdict(cfg),
    }


def gpt2_model_config(hf: dict[str, Any]) -> ModelConfig:
    """The flaxlm ModelConfig of a GPT-2 ``config.json``; refuses what GPT cannot express."""
    if hf.get("model_type") != "gpt2":
        raise ConversionError(f"model_type={hf.get('model_type')!r}: only gpt2 can be imported")
    refuse_unsupported(
        {
            "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
            "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx"), False),
            "add_cross_attention": (hf.get("add_cross_attention"), False),
        }
    )
    cfg = ModelConfig(
        family="gpt",
        vocab_size=hf["vocab_size"],
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
        max_seq_len=hf["n_positions"],
        positions="learned",
        activation=hf_activation(hf, "activation_function", "gelu_new"),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        use_bias=True,
        dropout=float(hf.get("resid_pdrop", 0.0)),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
    )
    return restore_saved_config(cfg, hf, gpt2_config)


def gpt2_tensors(params: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """GPT params -> GPT-2 state dict (float32)."""
    gpt2_config(cfg)  # refuses what cannot be expressed
    p = float32_numpy(params)
    d = cfg.d_model
    out = {"transformer.wte.weight": p["token_embed"]["embedding"]}
    if cfg.positions == "learned":
        out["transformer.wpe.weight"] = p["position_embed"]["embedding"]
    else:  # sinusoidal: the same values as a fixed table
        out["transformer.wpe.weight"] = sinusoidal_table(cfg)

    def norm(tree, name):
        out[f"{name}.weight"] = tree["scale"]
        out[f"{name}.bias"] = bias_or_zeros(tree, d)

    for i in range(cfg.n_layers):
        b, h = p[f"blocks_{i}"], f"transformer.h.{i}"
        attn = b["attn"]
        qkv = [attn[n]["kernel"].reshape(d, d) for n in ("query", "key", "value")]
        out[f"{h}.attn.c_attn.weight"] = np.concatenate(qkv, axis=1)
        out[f"{h}.attn.c_attn.bias"] = np.concatenate(
            [bias_or_zeros(attn[n], d) for n in ("query", "key", "value")]
        )
        out[f"{h}.attn.c_proj.weight"] = attn["out"]["kernel"].reshape(d, d)
        out[f"{h}.attn.c_proj.bias"] = bias_or_zeros(attn["out"], d)
        out[f"{h}.mlp.c_fc.weight"] = b["mlp"]["up"]["kernel"]
        out[f"{h}.mlp.c_fc.bias"] = bias_or_zeros(b["mlp"]["up"], cfg.d_ff)
        out[f"{h}.mlp.c_proj.weight"] = b["mlp"]["down"]["kernel"]
        out[f"{h}.mlp.c_proj.bias"] = bias_or_zeros(b["mlp"]["down"], d)
        norm(b["ln_attn"], f"{h}.ln_1")
        norm(b["ln_mlp"], f"{h}.ln_2")
    norm(p["ln_final"], "transformer.ln_f")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"]["kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def gpt_params(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """GPT-2 state dict -> GPT params (names with or without the ``transformer.`` prefix)."""
    t = {k.removeprefix("transformer."): np.asarray(v, np.float32) for k, v in tensors.items()}
    take = tensor_getter(t, "GPT2LMHeadModel")
    d, heads = cfg.d_model, cfg.n_heads
    k = d // heads

    def norm(name):
        tree = {"scale": take(f"{name}.weight")}
        if cfg.use_bias:
            tree["bias"] = take(f"{name}.bias")
        return tree

    def dense(kernel, bias_name):
        tree = {"kernel": kernel}
        if cfg.use_bias:
            tree["bias"] = take(bias_name)
        return tree

    params: dict[str, Any] = {"token_embed": {"embedding": take("wte.weight")}}
    if cfg.positions == "learned":
        params["position_embed"] = {"embedding": take("wpe.weight")}
    for i in range(cfg.n_layers):
        h = f"h.{i}"
        qkv = take(f"{h}.attn.c_attn.weight")
        qkv_bias = take(f"{h}.attn.c_attn.bias")
        attn = {}
        for j, name in enumerate(("query", "key", "value")):
            attn[name] = {"kernel": qkv[:, j * d : (j + 1) * d].reshape(d, heads, k)}
            if cfg.use_bias:
                attn[name]["bias"] = qkv_bias[j * d : (j + 1) * d].reshape(heads, k)
        attn["out"] = {"kernel": take(f"{h}.attn.c_proj.weight").reshape(heads, k, d)}
        if cfg.use_bias:
            attn["out"]["bias"] = take(f"{h}.attn.c_proj.bias")
        params[f"blocks_{i}"] = {
            "attn": attn,
            "ln_attn": norm(f"{h}.ln_1"),
            "ln_mlp": norm(f"{h}.ln_2"),
            "mlp": {
                "up": dense(take(f"{h}.mlp.c_fc.weight"), f"{h}.mlp.c_fc.bias"),
                "down": dense(take(f"{h}.mlp.c_proj.weight"), f"{h}.mlp.c_proj.bias"),
            },
        }
    params["ln_final"] = norm("ln_f")
    if not cfg.tie_embeddings:
        head = t.get("lm_head.weight")
        if head is None:
            raise ConversionError("tie_word_embeddings=false but the weights lack lm_head.weight")
        params["lm_head"] = {"kernel": np.ascontiguousarray(head.T)}
    return as_params(params, cfg)


GPT2 = Converter("gpt2", gpt2_config, gpt2_model_config, gpt2_tensors, gpt_params)
