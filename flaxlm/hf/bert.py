"""flaxlm BERT <-> transformers ``BertForPreTraining``: ``config.json`` fields and tensor names.

A post-LN flaxlm BERT (``model.norm_placement: post``) is HF BERT exactly: token + type +
absolute position embeddings and their LayerNorm, post-LN blocks, ``hidden_act`` ``gelu`` (the
exact erf form, our ``gelu_exact``) or ``gelu_new`` (tanh, our ``gelu``) or ``relu``, the
pooler (dense + tanh on [CLS]), the MLM head (``cls.predictions.transform`` dense, activation,
LayerNorm; decoder tied to the word embeddings; output bias ``cls.predictions.bias``) and the
NSP head (``cls.seq_relationship``). Expressed another way: sinusoidal positions (the fixed
table they compute) and ``use_bias: false`` (zero biases). Refused, with the option named:
pre-LN (HF BERT has no LayerNorm inside the branch nor a final one) and rotary positions.

torch ``nn.Linear`` weights are ``(out, in)``: ours transposed, heads flattened.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flaxlm.config import ModelConfig
from flaxlm.hf.base import (
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
from flaxlm.tokenizers.sentencepiece import PAD_ID

# transformers.BertConfig's defaults, for config.json files that leave a key out.
HF_BERT_DEFAULTS = {
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
}
# Old (TF-converted) checkpoints name LayerNorm parameters gamma / beta.
_OLD_NORM_NAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}


def bert_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of a ``BertForPreTraining`` equal to ``BERT(cfg)``; refuses options
    HF BERT cannot express."""
    if cfg.n_kv_heads not in (0, cfg.n_heads):
        raise ConversionError(
            f"model.n_kv_heads={cfg.n_kv_heads} (grouped-query attention) cannot be expressed "
            f"by BERT, whose key/value heads equal its n_heads={cfg.n_heads}"
        )
    refuse_options(cfg, "BERT", {"norm": ("layernorm",), "activation": tuple(TO_HF_ACTIVATIONS)})
    if cfg.norm_placement != "post":
        raise ConversionError(
            f"model.norm_placement={cfg.norm_placement!r} cannot be expressed by HF BERT "
            "(post-LN: LayerNorm after each residual add; needs 'post')"
        )
    if cfg.positions not in ("learned", "sinusoidal"):
        raise ConversionError(
            f"model.positions={cfg.positions!r} cannot be expressed by HF BERT "
            "(absolute position embeddings)"
        )
    return {
        "architectures": ["BertForPreTraining"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": TO_HF_ACTIVATIONS[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": 0.0,  # flaxlm has no attention-probability dropout
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.norm_eps,
        "position_embedding_type": "absolute",  # read by transformers 4.x
        "is_decoder": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,  # flaxlm's MLM decoder is always the token embedding
        "pad_token_id": PAD_ID,
        "dtype": "float32",
        "flaxlm_model": dataclasses.asdict(cfg),
    }


def bert_model_config(hf: dict[str, Any]) -> ModelConfig:
    """The flaxlm ModelConfig of an HF BERT ``config.json``; refuses what flaxlm's BERT
    cannot express."""
    if hf.get("model_type") != "bert":
        raise ConversionError(f"model_type={hf.get('model_type')!r}: only bert can be imported")
    refuse_unsupported(
        {
            "position_embedding_type": (hf.get("position_embedding_type"), "absolute"),
            "is_decoder": (hf.get("is_decoder"), False),
            "add_cross_attention": (hf.get("add_cross_attention"), False),
            "tie_word_embeddings": (hf.get("tie_word_embeddings"), True),
        }
    )
    hf_full = {**HF_BERT_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    cfg = ModelConfig(
        family="bert",
        vocab_size=hf_full["vocab_size"],
        d_model=hf_full["hidden_size"],
        n_layers=hf_full["num_hidden_layers"],
        n_heads=hf_full["num_attention_heads"],
        d_ff=hf_full["intermediate_size"],
        max_seq_len=hf_full["max_position_embeddings"],
        positions="learned",
        activation=hf_activation(hf_full, "hidden_act", "gelu"),
        tie_embeddings=True,
        use_bias=True,
        dropout=float(hf_full["hidden_dropout_prob"]),
        norm_eps=float(hf_full["layer_norm_eps"]),
        init_std=float(hf_full["initializer_range"]),
        norm_placement="post",
        type_vocab_size=hf_full["type_vocab_size"],
    )
    return restore_saved_config(cfg, hf, bert_config)


def bert_tensors(params: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """BERT params -> ``BertForPreTraining`` state dict (float32; the tied decoder weight is
    left out, as ``save_pretrained`` does)."""
    bert_config(cfg)  # refuses what cannot be expressed
    p = float32_numpy(params)
    d = cfg.d_model
    out: dict[str, np.ndarray] = {}

    def norm(tree, name):
        out[f"{name}.weight"] = tree["scale"]
        out[f"{name}.bias"] = bias_or_zeros(tree, d)

    def linear(tree, name, n_out):
        out[f"{name}.weight"] = tree["kernel"].reshape(-1, n_out).T
        out[f"{name}.bias"] = bias_or_zeros(tree, n_out)

    e = "bert.embeddings"
    out[f"{e}.word_embeddings.weight"] = p["token_embed"]["embedding"]
    if cfg.positions == "learned":
        out[f"{e}.position_embeddings.weight"] = p["position_embed"]["embedding"]
    else:  # sinusoidal: the same values as a fixed table
        out[f"{e}.position_embeddings.weight"] = sinusoidal_table(cfg)
    out[f"{e}.token_type_embeddings.weight"] = p["type_embed"]["embedding"]
    norm(p["ln_embed"], f"{e}.LayerNorm")
    for i in range(cfg.n_layers):
        b, h = p[f"blocks_{i}"], f"bert.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            linear(b["attn"][name], f"{h}.attention.self.{name}", d)
        linear(b["attn"]["out"], f"{h}.attention.output.dense", d)
        norm(b["ln_attn"], f"{h}.attention.output.LayerNorm")
        linear(b["mlp"]["up"], f"{h}.intermediate.dense", cfg.d_ff)
        linear(b["mlp"]["down"], f"{h}.output.dense", d)
        norm(b["ln_mlp"], f"{h}.output.LayerNorm")
    linear(p["pooler"], "bert.pooler.dense", d)
    linear(p["mlm_transform"], "cls.predictions.transform.dense", d)
    norm(p["mlm_ln"], "cls.predictions.transform.LayerNorm")
    out["cls.predictions.bias"] = p["mlm_bias"]
    linear(p["nsp_head"], "cls.seq_relationship", 2)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _hf_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """State dict names as ``BertForPreTraining`` writes them, less the ``bert.`` prefix."""
    out = {}
    for name, value in tensors.items():
        name = name.removeprefix("bert.")
        for old, new in _OLD_NORM_NAMES.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        out[name] = np.asarray(value, np.float32)
    return out


def bert_params(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """``BertForPreTraining`` state dict -> BERT params. Encoder names may carry the ``bert.``
    prefix or not; the heads (``cls.*``) and the pooler must be there."""
    t = _hf_names(tensors)
    if "cls.predictions.bias" not in t and "cls.predictions.decoder.bias" in t:
        t["cls.predictions.bias"] = t["cls.predictions.decoder.bias"]  # the tied copy
    take = tensor_getter(t, "BertForPreTraining with its pooler, MLM and NSP heads")
    d, heads = cfg.d_model, cfg.n_heads
    k = d // heads

    def norm(name):
        tree = {"scale": take(f"{name}.weight")}
        if cfg.use_bias:
            tree["bias"] = take(f"{name}.bias")
        return tree

    def linear(name, kernel_shape, bias_shape):
        tree = {"kernel": np.ascontiguousarray(take(f"{name}.weight").T.reshape(kernel_shape))}
        if cfg.use_bias:
            tree["bias"] = take(f"{name}.bias").reshape(bias_shape)
        return tree

    params: dict[str, Any] = {
        "token_embed": {"embedding": take("embeddings.word_embeddings.weight")},
        "type_embed": {"embedding": take("embeddings.token_type_embeddings.weight")},
        "ln_embed": norm("embeddings.LayerNorm"),
    }
    if cfg.positions == "learned":
        params["position_embed"] = {"embedding": take("embeddings.position_embeddings.weight")}
    for i in range(cfg.n_layers):
        h = f"encoder.layer.{i}"
        attn = {
            name: linear(f"{h}.attention.self.{name}", (d, heads, k), (heads, k))
            for name in ("query", "key", "value")
        }
        attn["out"] = linear(f"{h}.attention.output.dense", (heads, k, d), (d,))
        params[f"blocks_{i}"] = {
            "attn": attn,
            "ln_attn": norm(f"{h}.attention.output.LayerNorm"),
            "mlp": {
                "up": linear(f"{h}.intermediate.dense", (d, cfg.d_ff), (cfg.d_ff,)),
                "down": linear(f"{h}.output.dense", (cfg.d_ff, d), (d,)),
            },
            "ln_mlp": norm(f"{h}.output.LayerNorm"),
        }
    params["pooler"] = linear("pooler.dense", (d, d), (d,))
    params["mlm_transform"] = linear("cls.predictions.transform.dense", (d, d), (d,))
    params["mlm_ln"] = norm("cls.predictions.transform.LayerNorm")
    params["mlm_bias"] = take("cls.predictions.bias")
    params["nsp_head"] = linear("cls.seq_relationship", (d, 2), (2,))
    return as_params(params, cfg)


def _fit_run_config(cfg: Any) -> None:
    """One token type: no sentence pairs to train NSP on."""
    if cfg.model.type_vocab_size < 2:
        cfg.objective.nsp = False


BERT = Converter("bert", bert_config, bert_model_config, bert_tensors, bert_params, _fit_run_config)
