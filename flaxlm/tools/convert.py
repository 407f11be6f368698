"""``flaxlm convert``: checkpoints to and from HuggingFace ``transformers`` directories.

    flaxlm convert to-hf runs/gpt_demo hf/gpt_demo       # config.json + model.safetensors
    flaxlm convert from-hf hf/gpt_demo runs/imported     # a run dir with checkpoint 0

A flaxlm GPT maps exactly onto GPT-2 (``GPT2LMHeadModel``): pre-LN blocks, biases, learned
positions, ``gelu`` (tanh) = ``gelu_new``, tied or untied head. What GPT-2 cannot express
(rotary positions) is refused with the option named; what it can express another way is
written that way (sinusoidal positions as a fixed position table; no biases as zero biases).
``config.json`` also carries the flaxlm model config under ``flaxlm_model``, so importing an
exported directory gives back the same options and bit-identical parameters.

Only needs ``safetensors`` (the ``hf`` extra); ``transformers`` and ``torch`` are needed only to
*run* the exported model. BERT conversion plugs in as another entry of ``CONVERTERS``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.config import Config, ModelConfig
from flaxlm.models import layers

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
# GPT-2 activation names <-> ours: gelu_new and gelu_pytorch_tanh are both the tanh form.
GPT2_ACTIVATIONS = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}
FROM_GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}
FROM_GPT2_ACTIVATIONS["relu"] = "relu"


class ConversionError(ValueError):
    """The model uses an option the other side cannot express; the message names it."""


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError as exc:
        raise ConversionError(
            "flaxlm convert needs the hf extra: pip install 'flaxlm[hf]' (safetensors missing)"
        ) from exc
    return safetensors.numpy


# --- GPT <-> GPT-2 --------------------------------------------------------------------------


def gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of a ``GPT2LMHeadModel`` equal to ``GPT(cfg)``; refuses options
    GPT-2 cannot express."""
    if cfg.family != "gpt":
        raise ConversionError(f"model.family={cfg.family!r}: the GPT-2 exporter takes gpt")
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
        "bos_token_id": 2,  # flaxlm.tokenizer's fixed special ids
        "eos_token_id": 3,
        "pad_token_id": 0,
        "dtype": "float32",
        "flaxlm_model": dataclasses.asdict(cfg),
    }


def gpt2_model_config(hf: dict[str, Any]) -> ModelConfig:
    """The flaxlm ModelConfig of a GPT-2 ``config.json``; refuses what GPT cannot express."""
    if hf.get("model_type") != "gpt2":
        raise ConversionError(f"model_type={hf.get('model_type')!r}: only gpt2 can be imported")
    refuse = {
        "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx"), False),
        "add_cross_attention": (hf.get("add_cross_attention"), False),
    }
    for key, (value, supported) in refuse.items():
        if value not in (supported, None):
            raise ConversionError(f"{key}={value!r} is not supported (flaxlm needs {supported})")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in FROM_GPT2_ACTIVATIONS:
        raise ConversionError(
            f"activation_function={activation!r} is not one of {', '.join(FROM_GPT2_ACTIVATIONS)}"
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
        activation=FROM_GPT2_ACTIVATIONS[activation],
        tie_embeddings=hf.get("tie_word_embeddings", True),
        use_bias=True,
        dropout=float(hf.get("resid_pdrop", 0.0)),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
    )
    saved = hf.get("flaxlm_model")
    if saved:  # written by us: restore the options GPT-2 expressed another way
        mine = ModelConfig(**saved)
        same = {f: getattr(mine, f) == getattr(cfg, f) for f in ("vocab_size", "d_model")}
        if all(same.values()) and mine.n_layers == cfg.n_layers:
            cfg = mine
    return cfg


def gpt2_tensors(params: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """GPT params -> GPT-2 state dict (float32). Conv1D weights are ``(in, out)``, as ours."""
    gpt2_config(cfg)  # refuses what cannot be expressed
    p = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    d = cfg.d_model
    out = {"transformer.wte.weight": p["token_embed"]["embedding"]}
    if cfg.positions == "learned":
        out["transformer.wpe.weight"] = p["position_embed"]["embedding"]
    else:  # sinusoidal: the same values as a fixed table
        positions = jnp.arange(cfg.max_seq_len)[None]
        out["transformer.wpe.weight"] = np.asarray(layers.sinusoidal_embedding(positions, d)[0])

    def norm(tree, name):
        out[f"{name}.weight"] = tree["scale"]
        out[f"{name}.bias"] = tree.get("bias", np.zeros_like(tree["scale"]))

    def bias(tree, size):
        return tree.get("bias", np.zeros(size, np.float32)).reshape(size)

    for i in range(cfg.n_layers):
        b, h = p[f"blocks_{i}"], f"transformer.h.{i}"
        attn = b["attn"]
        qkv = [attn[n]["kernel"].reshape(d, d) for n in ("query", "key", "value")]
        out[f"{h}.attn.c_attn.weight"] = np.concatenate(qkv, axis=1)
        out[f"{h}.attn.c_attn.bias"] = np.concatenate(
            [bias(attn[n], d) for n in ("query", "key", "value")]
        )
        out[f"{h}.attn.c_proj.weight"] = attn["out"]["kernel"].reshape(d, d)
        out[f"{h}.attn.c_proj.bias"] = bias(attn["out"], d)
        out[f"{h}.mlp.c_fc.weight"] = b["mlp"]["up"]["kernel"]
        out[f"{h}.mlp.c_fc.bias"] = bias(b["mlp"]["up"], cfg.d_ff)
        out[f"{h}.mlp.c_proj.weight"] = b["mlp"]["down"]["kernel"]
        out[f"{h}.mlp.c_proj.bias"] = bias(b["mlp"]["down"], d)
        norm(b["ln_attn"], f"{h}.ln_1")
        norm(b["ln_mlp"], f"{h}.ln_2")
    norm(p["ln_final"], "transformer.ln_f")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"]["kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def gpt_params(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """GPT-2 state dict -> GPT params (names with or without the ``transformer.`` prefix)."""
    t = {k.removeprefix("transformer."): np.asarray(v, np.float32) for k, v in tensors.items()}
    d, heads = cfg.d_model, cfg.n_heads
    k = d // heads

    def take(name):
        if name not in t:
            raise ConversionError(f"the weights have no tensor {name!r}")
        return t[name]

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
    dtype = layers.dtype_of(cfg.param_dtype)
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


# --- directories ----------------------------------------------------------------------------


@dataclass
class Converter:
    """One model family's mapping: ModelConfig <-> HF config, params <-> HF tensors."""

    to_config: Any
    from_config: Any
    to_tensors: Any
    from_tensors: Any


# The BERT entry (BertForPreTraining) joins here once flaxlm has a BERT model (issue 3).
CONVERTERS = {"gpt": Converter(gpt2_config, gpt2_model_config, gpt2_tensors, gpt_params)}
HF_MODEL_TYPES = {"gpt2": "gpt"}


def export_hf(
    cfg: ModelConfig, params: Any, out_dir: str | Path, tokenizer_bytes: bytes | None = None
) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` (+ the sentencepiece ``tokenizer.model``)
    that ``transformers`` loads offline. Returns ``out_dir``."""
    if cfg.family not in CONVERTERS:
        raise ConversionError(f"model.family={cfg.family!r} has no HF converter yet")
    conv = CONVERTERS[cfg.family]
    hf_config = conv.to_config(cfg)
    tensors = conv.to_tensors(params, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _safetensors().save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_bytes is not None:
        (out / TOKENIZER_FILE).write_bytes(tokenizer_bytes)
    return out


def import_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads an HF directory (``config.json`` + ``model.safetensors``). Returns the flaxlm
    ModelConfig and params."""
    hf_dir = Path(hf_dir)
    config_path, weights_path = hf_dir / "config.json", hf_dir / WEIGHTS_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist")
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{weights_path} does not exist (only safetensors weights are read; re-save with "
            "save_pretrained(..., safe_serialization=True))"
        )
    hf_config = json.loads(config_path.read_text())
    family = HF_MODEL_TYPES.get(hf_config.get("model_type"))
    if family is None:
        raise ConversionError(
            f"model_type={hf_config.get('model_type')!r} is not one of {', '.join(HF_MODEL_TYPES)}"
        )
    conv = CONVERTERS[family]
    cfg = conv.from_config(hf_config)
    return cfg, conv.from_tensors(_safetensors().load_file(str(weights_path)), cfg)


def to_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """``flaxlm convert to-hf``: a run dir's newest (or a given) checkpoint -> HF directory."""
    from flaxlm.tools.load import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    return export_hf(loaded.cfg.model, loaded.params, out_dir, loaded.tokenizer.model_bytes)


def from_hf(
    hf_dir: str | Path, run_dir: str | Path, tokenizer: str | Path | None = None, seq_len: int = 0
) -> Path:
    """``flaxlm convert from-hf``: an HF directory -> a run dir with checkpoint 0.

    flaxlm runs need a sentencepiece tokenizer: ``tokenizer.model`` in ``hf_dir`` (what
    ``to-hf`` writes) or ``tokenizer``. ``seq_len`` (default ``min(n_positions, 1024)``)
    becomes ``data.seq_len``, the context generation uses. Returns the checkpoint folder.
    """
    from flaxlm.tokenizer import Tokenizer
    from flaxlm.tools.load import save_params_checkpoint

    model_cfg, params = import_hf(hf_dir)
    tok_path = Path(tokenizer) if tokenizer else Path(hf_dir) / TOKENIZER_FILE
    if not tok_path.is_file():
        raise FileNotFoundError(
            f"no sentencepiece tokenizer: {tok_path} does not exist (pass --tokenizer PATH.model)"
        )
    cfg = Config(model=model_cfg)
    cfg.data.seq_len = seq_len or min(model_cfg.max_seq_len, 1024)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConversionError(
            f"seq_len={cfg.data.seq_len} exceeds the position table n_positions="
            f"{model_cfg.max_seq_len}"
        )
    return save_params_checkpoint(run_dir, cfg, params, Tokenizer.load(tok_path))
