"""The ``gpt`` family: a pre-LN causal decoder trained on next-token prediction.

Batches are packed windows of the token stream (flaxlm/data/causal_batches.py) or, with several
``data.sources``, a weighted mixture of them whose rows carry ``source_ids``
(flaxlm/data/mixture.py); the loss is the cross-entropy of every position whose ``loss_mask``
is 1, optionally through the chunked LM head (``train.head_chunk``, flaxlm/losses/head_loss.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.config import Config, ConfigError, source_name
from flaxlm.data import (
    BATCH_KEYS,
    MIXTURE_BATCH_KEYS,
    CausalBatches,
    MixtureBatches,
    make_train_batches,
    unigram_cross_entropy,
)
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.inspection import causal_sample
from flaxlm.families.base import Baseline, Family, ReportField, TaskScoring
from flaxlm.hf.gpt2 import GPT2
from flaxlm.hf.llama import LLAMA, MIXTRAL
from flaxlm.losses.head_loss import fused_lm_loss
from flaxlm.losses.objectives import causal_lm_loss, lm_metrics
from flaxlm.models.backward import use_custom_backward
from flaxlm.models.gpt import GPT


def n_sources(cfg: Config) -> int:
    """Sources of a mixture (their rows carry ``source_ids``); 0 for one source."""
    return len(cfg.data.sources) if len(cfg.data.sources) > 1 else 0


def batch_keys(cfg: Config, training: bool) -> tuple[str, ...]:
    """Training batches of a mixture also say where each row came from."""
    return MIXTURE_BATCH_KEYS if training and n_sources(cfg) else BATCH_KEYS


def train_batches(prepared, cfg: Config, ramp: BatchRamp) -> CausalBatches | MixtureBatches:
    """The run's batches: ``ramp`` is its one BatchRamp (``train.batch_ramp``; the full batch
    is ``ramp.full``), mixed by ``data.stages`` when there are several sources."""
    d = cfg.data
    return make_train_batches(prepared, d.seq_len, ramp.full, cfg.train.seed, ramp, d.stages)


def eval_batches(split, cfg: Config, tokenizer, batch_size: int) -> CausalBatches:
    return CausalBatches(split, cfg.data.seq_len, batch_size, cfg.train.seed, shuffle=False)


def zero_metrics(cfg: Config, batch: dict) -> dict[str, jax.Array]:
    zeros = {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "correct", "n_tokens")}
    if "source_ids" in batch:
        for key in ("source_ce_sum", "source_tokens"):
            zeros[key] = jnp.zeros((n_sources(cfg),), jnp.float32)
    return zeros


def loss_scales(cfg: Config, batch: dict) -> jax.Array:
    """One over the predicted tokens of the whole step."""
    return 1.0 / jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)


def loss(params, mb, model, cfg: Config, scale, rng, deterministic: bool):
    """(scaled objective, summed metrics) of one ``(b, L)`` micro-batch."""
    chunk = cfg.train.head_chunk
    out = model.apply(
        {"params": params},
        mb["inputs"],
        mb["positions"],
        mb["segment_ids"],
        deterministic=deterministic,
        rngs={"dropout": rng},
        return_hidden=chunk > 0,
    )
    sources = n_sources(cfg) if "source_ids" in mb else 0
    source_ids = mb["source_ids"] if sources else None
    smoothing, z_loss = cfg.train.label_smoothing, cfg.train.z_loss
    if not chunk:
        objective, metrics = causal_lm_loss(
            out, mb["targets"], mb["loss_mask"], smoothing, z_loss, source_ids, sources
        )
        return objective * scale, metrics
    tied = cfg.model.tie_embeddings
    head = params["token_embed"]["embedding"] if tied else params["lm_head"]["kernel"]
    objective, ce_BxL, correct_BxL = fused_lm_loss(
        out, head, mb["targets"], mb["loss_mask"], head_is_embedding=tied, chunk=chunk,
        label_smoothing=smoothing, z_loss=z_loss, custom_backward=use_custom_backward(cfg),
    )  # fmt: skip
    metrics = lm_metrics(ce_BxL, correct_BxL, mb["loss_mask"], source_ids, sources)
    return objective * scale, metrics


def summarize(cfg: Config, m: dict[str, Any], xp=jnp) -> dict[str, Any]:
    n = xp.maximum(m["n_tokens"], 1.0)
    out = {"loss": m["ce_sum"] / n, "accuracy": m["correct"] / n, "n_tokens": m["n_tokens"]}
    if "source_ce_sum" in m:
        out["source_loss"] = m["source_ce_sum"] / xp.maximum(m["source_tokens"], 1.0)
        out["source_tokens"] = m["source_tokens"]
    return out


def log_fields(cfg: Config, metrics: dict[str, Any]) -> dict[str, float]:
    """``loss/<source>`` of each source present in the step's batch (a mixture)."""
    if "source_loss" not in metrics:
        return {}
    names = [source_name(s) for s in cfg.data.sources]
    per_source = zip(names, metrics["source_loss"], metrics["source_tokens"], strict=True)
    return {f"loss/{name}": float(loss) for name, loss, n in per_source if n > 0}


def eval_report(cfg: Config, totals: dict[str, Any]) -> dict[str, Any]:
    out = summarize(cfg, totals, xp=np)
    loss = float(out["loss"])
    return {
        "val_loss": loss,
        "perplexity": float(np.exp(min(loss, 50.0))),
        "accuracy": float(out["accuracy"]),
        "tokens": int(out["n_tokens"]),
    }


class UnigramBaseline(Baseline):
    """The cross-entropy of the evaluated tokens under the train split's unigram distribution."""

    def __init__(self, train, split, vocab_size: int):
        self.loss = unigram_cross_entropy(train, split, vocab_size)

    def report(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"unigram_loss": self.loss, "gain_over_unigram": self.loss - result["val_loss"]}


def baseline(cfg: Config, tokenizer, train, split) -> Baseline:
    return UnigramBaseline(train, split, tokenizer.vocab_size)


def synthetic_batch(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One global batch of random tokens (one document per row)."""
    batch, seq_len, vocab = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    tokens = rng.integers(7, vocab, (batch, seq_len + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1].copy(),
        "targets": tokens[:, 1:].copy(),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "loss_mask": np.ones((batch, seq_len), np.float32),
    }


def check_config(cfg: Config) -> None:
    if cfg.model.norm_placement != "pre":
        raise ConfigError(
            f"model.norm_placement={cfg.model.norm_placement!r}: GPT is pre-LN; post is for bert"
        )


def token_log_probs(model, params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Task scoring (``TaskScoring`` kind ``causal``): ``log p(targets_BxL | tokens up to
    each position)`` and whether each target is the argmax, both ``(B, L)``."""
    logits_BxLxV = model.apply(
        {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    log_p_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    targets_BxL = batch["targets"]
    log_p_BxL = jnp.take_along_axis(log_p_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return log_p_BxL, jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL


GPT_FAMILY = Family(
    name="gpt",
    build_model=GPT,
    batch_keys=batch_keys,
    train_batches=train_batches,
    eval_batches=eval_batches,
    zero_metrics=zero_metrics,
    loss_scales=loss_scales,
    loss=loss,
    summarize=summarize,
    log_fields=log_fields,
    eval_report=eval_report,
    synthetic_batch=synthetic_batch,
    inspect_sample=causal_sample,
    baseline=baseline,
    report_fields=(
        ReportField("perplexity", "perplexity", "number"),
        ReportField("accuracy", "next-token accuracy", "percent"),
        ReportField("unigram_loss", "unigram baseline"),
        ReportField("gain_over_unigram", "gain over unigram"),
    ),
    headline=("perplexity",),
    converters=(MIXTRAL, LLAMA, GPT2),
    generates=True,
    check_config=check_config,
    task_scoring=TaskScoring(
        "causal", token_log_probs, ("loglikelihood", "loglikelihood_rolling", "generate_until")
    ),
)
