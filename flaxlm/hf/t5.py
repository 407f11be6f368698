"""flaxlm T5 <-> transformers ``T5ForConditionalGeneration``: ``config.json`` and tensor names.

Both layouts: T5 v1.1 (``model.t5.gated_mlp: true``, ``activation: gelu`` = HF
``gated-gelu``, untied head: ``tie_word_embeddings: false``, an ``lm_head.weight`` of its
own) and the original T5 (``gated_mlp: false``, ``activation: relu``, the head tied to
``shared.weight`` with its input scaled by ``d_model^-1/2``). HF keeps one relative position
table per stack in block 0 (``...block.0.layer.0.SelfAttention.relative_attention_bias``);
ours is the stack's ``relative_bias``.

Scores: HF T5 does not scale ``q . k``; flaxlm's kernels divide by ``sqrt(d_kv)``. So the
query kernels are multiplied by ``sqrt(d_kv)`` coming in and divided going out (exact for
head dims that are powers of 4, e.g. 64). Refused, with the option named: LayerNorm, biases,
grouped-query attention, Mixture-of-Experts blocks (HF's Switch Transformers is another
model), gated exact-erf GELU (HF's ``gated-gelu`` is the tanh form).

The tokenizer goes with ``to-hf`` (flaxlm/tokenizers/hf_export.py), plus T5's sentinels: the
ids from the tokenizer's vocabulary size up to ``model.vocab_size`` become the added tokens
``<extra_id_0>`` (the highest id) ... ``<extra_id_{n-1}>``, as span corruption uses them
(flaxlm/data/span_corruption.py), so set ``model.vocab_size`` = tokenizer vocabulary +
``seq2seq.extra_ids``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from flaxlm.config import ModelConfig
from flaxlm.hf.base import (
    ConversionError,
    Converter,
    float32_numpy,
    refuse_options,
    refuse_unsupported,
    restore_saved_config,
    tensor_getter,
)
from flaxlm.models.t5 import T5Options, decoder_layers
from flaxlm.tokenizers.sentencepiece import EOS_ID, PAD_ID

# ours -> the act name in HF's feed_forward_proj (HF's "gated-gelu" means gelu_new: tanh).
_ACTS = {"relu": "relu", "gelu": "gelu_new", "gelu_exact": "gelu"}


def feed_forward_proj(cfg: ModelConfig) -> str:
    """HF's ``feed_forward_proj`` of our MLP options."""
    refuse_options(cfg, "T5", {"activation": tuple(_ACTS)})
    if not cfg.t5.gated_mlp:
        return _ACTS[cfg.activation]
    if cfg.activation == "gelu_exact":
        raise ConversionError(
            "model.activation='gelu_exact' with model.t5.gated_mlp cannot be expressed by HF T5 "
            "(its gated-gelu is the tanh form: use 'gelu')"
        )
    return "gated-gelu" if cfg.activation == "gelu" else f"gated-{cfg.activation}"


def t5_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of a ``T5ForConditionalGeneration`` equal to ``T5(cfg)``."""
    refuse_options(cfg, "T5", {"norm": ("rmsnorm",), "use_bias": (False,)})
    if cfg.n_kv_heads not in (0, cfg.n_heads):
        raise ConversionError(
            f"model.n_kv_heads={cfg.n_kv_heads} cannot be expressed by HF T5 (its key/value "
            f"heads equal num_heads={cfg.n_heads})"
        )
    if cfg.moe.num_experts:
        raise ConversionError(
            f"model.moe.num_experts={cfg.moe.num_experts} cannot be expressed by HF T5 "
            "(dense feed-forward blocks only)"
        )
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_model // cfg.n_heads,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": decoder_layers(cfg),
        "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.t5.relative_buckets,
        "relative_attention_max_distance": cfg.t5.relative_max_distance,
        "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_factor": 1.0,
        "feed_forward_proj": feed_forward_proj(cfg),
        "is_encoder_decoder": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "decoder_start_token_id": PAD_ID,
        "dtype": "float32",
        "flaxlm_model": dataclasses.asdict(cfg),
    }


def t5_model_config(hf: dict[str, Any]) -> ModelConfig:
    """The flaxlm ModelConfig of a T5 ``config.json``."""
    proj = hf.get("feed_forward_proj", "relu")
    gated, _, act = proj.rpartition("-")
    refuse_unsupported({"feed_forward_proj gate": (gated or None, "gated")})
    act = "gelu_new" if proj == "gated-gelu" else act
    ours = {v: k for k, v in _ACTS.items()}
    if act not in ours:
        raise ConversionError(f"feed_forward_proj={proj!r}: {act!r} is not one of {list(ours)}")
    d_model, heads = hf["d_model"], hf["num_heads"]
    if hf.get("d_kv", d_model // heads) * heads != d_model:
        raise ConversionError(
            f"d_kv={hf['d_kv']} x num_heads={heads} != d_model={d_model} (flaxlm needs them equal)"
        )
    layers = hf.get("num_layers", 6)
    options = T5Options(
        decoder_layers=hf.get("num_decoder_layers") or layers,
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        gated_mlp=bool(gated),
    )
    # The "tie_word_embeddings" a checkpoint was saved with says whether the head is tied
    # (and scaled), as transformers reads it; v1.1 files say false.
    tied = hf.get("tie_word_embeddings", True) and hf.get("scale_decoder_outputs", True)
    cfg = ModelConfig(
        family="t5", vocab_size=hf["vocab_size"], d_model=d_model, n_layers=layers,
        n_heads=heads, d_ff=hf["d_ff"], max_seq_len=512, activation=ours[act], norm="rmsnorm",
        tie_embeddings=bool(tied), use_bias=False, dropout=hf.get("dropout_rate", 0.1),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), extra_sections=(("t5", options),),
    )  # fmt: skip
    return restore_saved_config(cfg, hf, t5_config)


def _stacks(cfg: ModelConfig) -> tuple[tuple[str, int, bool], ...]:
    return (("encoder", cfg.n_layers, False), ("decoder", decoder_layers(cfg), True))


def _layer_names(decoder: bool) -> dict[str, str]:
    """Our block sublayer -> HF ``layer.{n}`` prefix."""
    if decoder:
        return {"ln_attn": "layer.0", "ln_cross": "layer.1", "ln_mlp": "layer.2"}
    return {"ln_attn": "layer.0", "ln_mlp": "layer.1"}


def _mlp_names(cfg: ModelConfig) -> dict[str, str]:
    if cfg.t5.gated_mlp:
        return {"gate": "wi_0", "up": "wi_1", "down": "wo"}
    return {"up": "wi", "down": "wo"}


def t5_tensors(params: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """T5 params -> HF state dict (float32)."""
    t5_config(cfg)
    p = float32_numpy(params)
    d, k = cfg.d_model, cfg.d_model // cfg.n_heads
    out = {"shared.weight": p["token_embed"]["embedding"]}
    for stack, n, decoder in _stacks(cfg):
        names = _layer_names(decoder)
        rel = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out[rel] = p[stack]["relative_bias"]["embedding"]
        for i in range(n):
            b, h = p[stack][f"blocks_{i}"], f"{stack}.block.{i}"
            for ln, layer in names.items():
                out[f"{h}.{layer}.layer_norm.weight"] = b[ln]["scale"]
            attns = [("attn", "layer.0.SelfAttention")]
            if decoder:
                attns.append(("cross_attn", "layer.1.EncDecAttention"))
            for ours, theirs in attns:
                a = b[ours]
                out[f"{h}.{theirs}.q.weight"] = (a["query"]["kernel"].reshape(d, -1) / k**0.5).T
                out[f"{h}.{theirs}.k.weight"] = a["key"]["kernel"].reshape(d, -1).T
                out[f"{h}.{theirs}.v.weight"] = a["value"]["kernel"].reshape(d, -1).T
                out[f"{h}.{theirs}.o.weight"] = a["out"]["kernel"].reshape(-1, d).T
            for ours, theirs in _mlp_names(cfg).items():
                out[f"{h}.{names['ln_mlp']}.DenseReluDense.{theirs}.weight"] = b["mlp"][ours][
                    "kernel"
                ].T
        out[f"{stack}.final_layer_norm.weight"] = p[stack]["ln_final"]["scale"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"]["kernel"].T
    return {name: np.ascontiguousarray(v) for name, v in out.items()}


def t5_params(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """HF state dict -> T5 params."""
    t = {name: np.asarray(v, np.float32) for name, v in tensors.items()}
    take = tensor_getter(t, "T5ForConditionalGeneration")
    d, heads = cfg.d_model, cfg.n_heads
    k = d // heads
    params: dict[str, Any] = {"token_embed": {"embedding": take("shared.weight")}}
    for stack, n, decoder in _stacks(cfg):
        rel = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        tree: dict[str, Any] = {"relative_bias": {"embedding": take(rel)}}
        for i in range(n):
            h = f"{stack}.block.{i}"
            names = _layer_names(decoder)
            block: dict[str, Any] = {
                ln: {"scale": take(f"{h}.{layer}.layer_norm.weight")} for ln, layer in names.items()
            }
            attns = [("attn", "layer.0.SelfAttention")]
            if decoder:
                attns.append(("cross_attn", "layer.1.EncDecAttention"))
            for ours, theirs in attns:

                def w(x: str, theirs: str = theirs, h: str = h) -> np.ndarray:
                    return take(f"{h}.{theirs}.{x}.weight")

                block[ours] = {
                    "query": {"kernel": (w("q").T * math.sqrt(k)).reshape(d, heads, k)},
                    "key": {"kernel": w("k").T.reshape(d, heads, k)},
                    "value": {"kernel": w("v").T.reshape(d, heads, k)},
                    "out": {"kernel": w("o").T.reshape(heads, k, d)},
                }
            block["mlp"] = {
                ours: {"kernel": take(f"{h}.{names['ln_mlp']}.DenseReluDense.{theirs}.weight").T}
                for ours, theirs in _mlp_names(cfg).items()
            }
            tree[f"blocks_{i}"] = block
        tree["ln_final"] = {"scale": take(f"{stack}.final_layer_norm.weight")}
        params[stack] = tree
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": t.get("lm_head.weight", t["shared.weight"]).T}
    return params


def add_sentinels(out_dir: str | Path, tokenizer_vocab: int, model_vocab: int) -> int:
    """Adds T5's sentinels to the ``tokenizer.json`` / ``tokenizer_config.json`` written in
    ``out_dir``: ids ``tokenizer_vocab .. model_vocab - 1`` as ``<extra_id_{n-1}>`` ..
    ``<extra_id_0>``. Returns how many."""
    out = Path(out_dir)
    n = model_vocab - tokenizer_vocab
    tokenizer_json = out / "tokenizer.json"
    if n <= 0 or not tokenizer_json.is_file():
        return 0
    names = [f"<extra_id_{i}>" for i in range(n)]
    doc = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    added = doc.setdefault("added_tokens", [])
    for i, name in enumerate(names):
        added.append(
            {"id": model_vocab - 1 - i, "content": name, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
        )  # fmt: skip
    added.sort(key=lambda token: token["id"])
    tokenizer_json.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["extra_special_tokens"] = names
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return n


T5_CONVERTER = Converter(
    hf_model_type="t5",
    to_config=t5_config,
    from_config=t5_model_config,
    to_tensors=t5_tensors,
    from_tensors=t5_params,
    tokenizer_files=lambda out, tok, cfg: add_sentinels(out, tok.vocab_size, cfg.vocab_size),
)
