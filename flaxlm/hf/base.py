"""What every HuggingFace converter shares: the error, the converter record, activation names,
and the helpers both directions of each family use.

The per-architecture modules (``flaxlm.hf.gpt2``, ``flaxlm.hf.llama``, ``flaxlm.hf.bert``)
import this; each model family's entry in the family table (flaxlm/families/) names its
converters, and
``flaxlm.tools.convert`` reads and writes the files, so imports point one way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.config import ModelConfig, MoEConfig
from flaxlm.models import layers

# Ours -> transformers' ACT2FN names (GPT-2 and BERT share them): gelu_new and
# gelu_pytorch_tanh are both the tanh form, HF "gelu" is the exact erf form.
TO_HF_ACTIVATIONS = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}
FROM_HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}
FROM_HF_ACTIVATIONS["relu"] = "relu"
# HF config keys that say nothing about the function the model computes.
_BOOKKEEPING_KEYS = ("flaxlm_model", "architectures", "dtype", "transformers_version")


class ConversionError(ValueError):
    """The model uses an option the other side cannot express; the message names it."""


@dataclass
class Converter:
    """One model family's mapping: ModelConfig <-> HF config, params <-> HF tensors."""

    hf_model_type: str  # config.json "model_type" this converter reads
    to_config: Callable[[ModelConfig], dict[str, Any]]
    from_config: Callable[[dict[str, Any]], ModelConfig]
    to_tensors: Callable[[Any, ModelConfig], dict[str, np.ndarray]]
    from_tensors: Callable[[dict[str, np.ndarray], ModelConfig], dict[str, Any]]
    # Adjusts the run config of an imported model (e.g. no NSP without two token types).
    fit_run_config: Callable[[Any], None] = lambda cfg: None
    # Whether this converter exports ``cfg`` (a family may have several, e.g. GPT-2 and
    # Llama for GPT); the family's last converter takes the rest, refusing what it cannot do.
    accepts: Callable[[ModelConfig], bool] = lambda cfg: True
    # Adds to the tokenizer files ``to-hf`` wrote in a folder (e.g. T5's sentinel tokens):
    # ``(folder, tokenizer, cfg)``.
    tokenizer_files: Callable[[Any, Any, ModelConfig], Any] = lambda out, tok, cfg: None


def refuse_options(cfg: ModelConfig, model: str, supported: dict[str, tuple[Any, ...]]) -> None:
    """ConversionError naming the first ``model.<option>`` whose value ``model`` cannot
    express (``supported``: option -> the values it can)."""
    for option, values in supported.items():
        value = getattr(cfg, option)
        if value not in values:
            raise ConversionError(
                f"model.{option}={value!r} cannot be expressed by {model} "
                f"(it has {' or '.join(map(repr, values))})"
            )


def hf_activation(hf: dict[str, Any], key: str, default: str) -> str:
    """Our activation name for ``hf[key]``; refuses activations flaxlm does not have."""
    activation = hf.get(key, default)
    if activation not in FROM_HF_ACTIVATIONS:
        raise ConversionError(
            f"{key}={activation!r} is not one of {', '.join(FROM_HF_ACTIVATIONS)}"
        )
    return FROM_HF_ACTIVATIONS[activation]


def refuse_unsupported(settings: dict[str, tuple[Any, Any]]) -> None:
    """``{key: (value in config.json, the one flaxlm supports)}``; a missing key (None) is
    fine. Raises ConversionError naming the first key that differs."""
    for key, (value, supported) in settings.items():
        if value not in (supported, None):
            raise ConversionError(f"{key}={value!r} is not supported (flaxlm needs {supported!r})")


def restore_saved_config(
    cfg: ModelConfig, hf: dict[str, Any], to_config: Callable[[ModelConfig], dict[str, Any]]
) -> ModelConfig:
    """The flaxlm config an exporter kept under ``flaxlm_model``, if it still describes this
    HF config (it restores what HF expressed another way: sinusoidal positions, no biases);
    otherwise ``cfg``, the config read from the HF fields."""
    saved = hf.get("flaxlm_model")
    if not saved:
        return cfg
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        kwargs = {k: v for k, v in saved.items() if k in known}
        kwargs["moe"] = MoEConfig(**kwargs.get("moe", {}))
        mine = ModelConfig(**kwargs)
        expected = to_config(mine)
    except (ConversionError, TypeError, ValueError):
        return cfg
    for key, value in expected.items():
        if key not in _BOOKKEEPING_KEYS and key in hf and hf[key] != value:
            return cfg  # config.json was edited after export: trust its HF fields
    return mine


def float32_numpy(params: Any) -> Any:
    """The param tree as host float32 numpy arrays (what safetensors writes)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)


def as_params(tree: Any, cfg: ModelConfig) -> Any:
    """A tree of numpy arrays as jax arrays in ``cfg.param_dtype``."""
    dtype = layers.dtype_of(cfg.param_dtype)
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def sinusoidal_table(cfg: ModelConfig) -> np.ndarray:
    """The fixed sinusoidal positions as a ``(max_seq_len, d_model)`` table: how a model with
    learned absolute positions expresses them exactly."""
    positions_1xL = jnp.arange(cfg.max_seq_len)[None]
    return np.asarray(layers.sinusoidal_embedding(positions_1xL, cfg.d_model)[0])


def bias_or_zeros(tree: dict[str, np.ndarray], size: int) -> np.ndarray:
    """A layer's bias flattened to ``(size,)``, or zeros for ``use_bias: false`` layers."""
    return tree.get("bias", np.zeros(size, np.float32)).reshape(size)


def tensor_getter(tensors: dict[str, np.ndarray], model: str) -> Callable[[str], np.ndarray]:
    """``take(name)``: the tensor, or a ConversionError naming the missing one."""

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise ConversionError(f"the weights have no tensor {name!r} (expected a {model})")
        return tensors[name]

    return take
