"""``flaxlm convert``: checkpoints to and from HuggingFace ``transformers`` directories.

    flaxlm convert to-hf runs/gpt_demo hf/gpt_demo       # config.json + model.safetensors
    flaxlm convert to-hf runs/bert_demo hf/bert_demo     # the same for a BERT run
    flaxlm convert from-hf hf/gpt_demo runs/imported     # a run dir with checkpoint 0

Tokenizers travel both ways (flaxlm/tokenizers/hf_export.py): ``to-hf`` writes the run's tokenizer
as
``tokenizer.json`` + ``tokenizer_config.json`` (and a sentencepiece run's ``tokenizer.model``),
so ``AutoTokenizer.from_pretrained(OUT)`` encodes text to the run's ids; ``from-hf`` gives the
run the directory's own tokenizer (``tokenizer.model``, ``tokenizer.json`` or vocab files).

The converters of each model family are named by its entry in the family table
(flaxlm/families/): GPT <-> ``GPT2LMHeadModel`` (flaxlm/hf/gpt2.py) or, for a Llama-style
GPT (RMSNorm, SwiGLU, RoPE, GQA), ``LlamaForCausalLM`` (flaxlm/hf/llama.py); BERT <->
``BertForPreTraining`` (flaxlm/hf/bert.py). Each writes what the HF
model can express exactly, writes the rest another way where it can (sinusoidal positions as a
fixed table, no biases as zero biases) and refuses the rest with the option named.
``config.json`` also carries the flaxlm model config under ``flaxlm_model``, so importing an
exported directory gives back the same options and bit-identical parameters.

Only needs ``safetensors`` (the ``hf`` extra); ``transformers`` and ``torch`` are needed only to
*run* the exported model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxlm.config import Config, ModelConfig
from flaxlm.families import build_model, get_family, registered_families
from flaxlm.hf.base import ConversionError, Converter
from flaxlm.hf.bert import bert_config, bert_model_config, bert_params, bert_tensors
from flaxlm.hf.gpt2 import (
    FROM_GPT2_ACTIVATIONS,
    GPT2_ACTIVATIONS,
    gpt2_config,
    gpt2_model_config,
    gpt2_tensors,
    gpt_params,
)
from flaxlm.tokenizers.hf_export import load_hf_dir_tokenizer, write_tokenizer_files
from flaxlm.tokenizers.sentencepiece import Tokenizer

__all__ = [
    "FROM_GPT2_ACTIVATIONS",
    "GPT2_ACTIVATIONS",
    "WEIGHTS_FILE",
    "ConversionError",
    "Converter",
    "bert_config",
    "bert_model_config",
    "bert_params",
    "bert_tensors",
    "converters",
    "export_hf",
    "from_hf",
    "gpt2_config",
    "gpt2_model_config",
    "gpt2_tensors",
    "hf_model_types",
    "gpt_params",
    "import_hf",
    "to_hf",
]

WEIGHTS_FILE = "model.safetensors"


def converters() -> dict[str, tuple[str, Converter]]:
    """config.json ``model_type`` -> (the family, its converter), from the family table."""
    families = (get_family(name) for name in registered_families())
    return {conv.hf_model_type: (f.name, conv) for f in families for conv in f.converters}


def hf_model_types() -> dict[str, str]:
    """config.json ``model_type`` -> the family that reads it."""
    return {model_type: family for model_type, (family, _) in converters().items()}


def converter_for(cfg: ModelConfig) -> Converter:
    """The converter that exports ``cfg``: the first of its family's that accepts it, else
    the last (which refuses, naming the option it cannot express)."""
    convs = get_family(cfg.family).converters
    if not convs:
        families = sorted({family for family, _ in converters().values()})
        raise ConversionError(
            f"model.family={cfg.family!r} has no HF converter (families with one: "
            f"{', '.join(families)})"
        )
    return next((c for c in convs if c.accepts(cfg)), convs[-1])


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError as exc:
        raise ConversionError(
            "flaxlm convert needs the hf extra: pip install 'flaxlm[hf]' (safetensors missing)"
        ) from exc
    return safetensors.numpy


def export_hf(
    cfg: ModelConfig,
    params: Any,
    out_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    seq_len: int | None = None,
) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` (+ the tokenizer's HF files, its special
    ids in config.json, ``seq_len`` as its ``model_max_length``) that ``transformers`` loads
    offline. Returns ``out_dir``."""
    conv = converter_for(cfg)
    hf_config = conv.to_config(cfg)  # its flaxlm_model keeps scan_layers, for the way back
    if tokenizer is not None:
        ids = tokenizer.special_ids()
        for role in ("bos", "eos", "pad"):
            if f"{role}_token_id" in hf_config:
                hf_config[f"{role}_token_id"] = ids[role]
    tensors = conv.to_tensors(
        unscan_blocks(params, cfg), dataclasses.replace(cfg, scan_layers=False)
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _safetensors().save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, out, seq_len)
        conv.tokenizer_files(out, tokenizer, cfg)
    return out


def import_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads an HF directory (``config.json`` + ``model.safetensors``). Returns the flaxlm
    ModelConfig and params (checked against the shapes the model needs)."""
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
    if hf_config.get("model_type") not in converters():
        raise ConversionError(
            f"model_type={hf_config.get('model_type')!r} is not one of {', '.join(converters())}"
        )
    _, conv = converters()[hf_config["model_type"]]
    cfg = conv.from_config(hf_config)
    unscanned = dataclasses.replace(cfg, scan_layers=False)
    params = conv.from_tensors(_safetensors().load_file(str(weights_path)), unscanned)
    params = scan_blocks(params, cfg)
    _check_shapes(cfg, params)
    return cfg, params


def unscan_blocks(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """``scan_layers`` params (``blocks/layers/block/...``, stacked on a leading layer axis) as the
    unrolled ``blocks_0 .. blocks_{n-1}`` every converter reads; an encoder-decoder's stacks
    (``encoder/layers/block``) become ``encoder/blocks_{i}``; other params unchanged."""
    if not cfg.scan_layers:
        return params
    if "blocks" not in params:
        return {k: _unstack(v) if isinstance(v, dict) and "layers" in v else v
                for k, v in params.items()}  # fmt: skip
    out = {k: v for k, v in params.items() if k != "blocks"}
    return {**out, **_unstack(params["blocks"])}


def _unstack(tree: dict[str, Any]) -> dict[str, Any]:
    stacked = tree["layers"]["block"]
    out = {k: v for k, v in tree.items() if k != "layers"}
    for i in range(len(jax.tree.leaves(stacked)[0])):
        out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def scan_blocks(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """The inverse of :func:`unscan_blocks` for a ``scan_layers`` config."""
    if not cfg.scan_layers:
        return params
    if "blocks_0" not in params:
        return {k: _stack(v) if isinstance(v, dict) and "blocks_0" in v else v
                for k, v in params.items()}  # fmt: skip
    return _stack(params, "blocks")


def _stack(tree: dict[str, Any], name: str = "layers") -> dict[str, Any]:
    names = [k for k in tree if k.startswith("blocks_")]
    out = {k: v for k, v in tree.items() if k not in names}
    blocks = [tree[f"blocks_{i}"] for i in range(len(names))]
    stacked = {"block": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
    out[name] = {"layers": stacked} if name == "blocks" else stacked
    return out


def _check_shapes(cfg: ModelConfig, params: dict[str, Any]) -> None:
    """Refuses weights whose shapes disagree with config.json, naming the first one."""
    tokens_1x8 = jnp.zeros((1, 8), jnp.int32)
    init = jax.eval_shape(build_model(cfg).init, jax.random.key(0), tokens_1x8)
    want = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(init)["params"])[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in want:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if path not in got:
            raise ConversionError(f"the converted params lack {name}")
        if got[path].shape != leaf.shape:
            raise ConversionError(
                f"{name} has shape {got[path].shape}, config.json needs {leaf.shape}"
            )


def to_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """``flaxlm convert to-hf``: a run dir's newest (or a given) checkpoint -> HF directory."""
    from flaxlm.tools.load import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    return export_hf(
        loaded.cfg.model, loaded.params, out_dir, loaded.tokenizer, loaded.cfg.data.seq_len
    )


def from_hf(
    hf_dir: str | Path, run_dir: str | Path, tokenizer: str | Path | None = None, seq_len: int = 0
) -> Path:
    """``flaxlm convert from-hf``: an HF directory -> a run dir with checkpoint 0.

    The run's tokenizer is ``tokenizer`` (a sentencepiece ``.model``, a ``tokenizer.json`` or an
    HF tokenizer directory) if given, else ``hf_dir``'s own (:func:`load_hf_dir_tokenizer`:
    ``tokenizer.model`` as ``to-hf`` writes it, ``tokenizer.json``, vocab files). ``seq_len``
    (default ``min(positions, 1024)``, the position table's size being ``n_positions`` /
    ``max_position_embeddings``) becomes ``data.seq_len``: the context of generation, or of
    BERT training examples. Returns the checkpoint folder.
    """
    from flaxlm.tools.load import save_params_checkpoint

    model_cfg, params = import_hf(hf_dir)
    tok = Tokenizer.load(tokenizer) if tokenizer else load_hf_dir_tokenizer(hf_dir)
    if tok is None:
        raise FileNotFoundError(
            f"{hf_dir} has no tokenizer (tokenizer.model, tokenizer.json, vocab.txt or "
            "vocab.json); pass --tokenizer PATH (.model, tokenizer.json or an HF directory)"
        )
    cfg = Config(model=model_cfg)
    cfg.data.seq_len = seq_len or min(model_cfg.max_seq_len, 1024)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConversionError(
            f"seq_len={cfg.data.seq_len} exceeds the position table of "
            f"{model_cfg.max_seq_len} positions"
        )
    converter_for(model_cfg).fit_run_config(cfg)
    return save_params_checkpoint(run_dir, cfg, params, tok)
