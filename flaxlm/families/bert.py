"""The ``bert`` family: a bidirectional encoder with MLM (+ NSP), or the unified objective.

Three batch layouts, chosen by ``cfg.objective`` (flaxlm/data/masked_batches.py): ``nsp`` (BERT
sentence pairs, masked), ``mlm`` (RoBERTa-style packed rows, masked) and ``unified`` (each row
draws MLM, causal or prefix-LM by the configured shares). The losses:

- ``nsp`` / ``mlm``: ``loss = mlm_loss + nsp_weight * nsp_loss``, the MLM loss a mean over the
  step's masked positions (logits only at those, gathered), the NSP loss a mean over its rows.
- ``unified``: each objective's mean token loss, weighted by its share; an objective absent
  from a step drops out and the others' weights are renormalised.

The guard watches the total ``loss``; ``mlm_loss``, ``mlm_accuracy``, ``nsp_loss``,
``nsp_accuracy`` (BERT) and ``<objective>_loss`` (unified) are logged beside it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.config import Config, ConfigError
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.inspection import masked_sample
from flaxlm.data.masked_batches import OBJECTIVES, batch_keys, layout_of, make_masked_batches
from flaxlm.data.mlm_masks import OBJECTIVE_SECTION, resolve_max_predictions
from flaxlm.families.base import Baseline, Family, ReportField, TaskScoring
from flaxlm.hf.bert import BERT as BERT_CONVERTER
from flaxlm.losses.objectives import mlm_loss, nsp_loss, objective_lm_loss
from flaxlm.models.bert import BERT

# Scalar train metrics written to metrics.jsonl besides loss / accuracy / lr / grad_norm.
BERT_METRICS = ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy")


def objective_weights(cfg: Config) -> np.ndarray:
    """(3,) the unified shares of mlm, causal, prefix_lm."""
    ob = cfg.objective
    return np.array([ob.mlm, ob.causal, ob.prefix_lm], dtype=np.float32)


def train_batches(prepared, cfg: Config, ramp: BatchRamp):
    """The run's batches: ``ramp`` is its one BatchRamp (the full batch is ``ramp.full``)."""
    return make_masked_batches(prepared.train, cfg, prepared.tokenizer, ramp.full, ramp=ramp)


def eval_batches(split, cfg: Config, tokenizer, batch_size: int):
    return make_masked_batches(split, cfg, tokenizer, batch_size, shuffle=False)


def zero_metrics(cfg: Config, batch: dict) -> dict[str, jax.Array]:
    layout = layout_of(cfg)
    if layout == "unified":
        return {k: jnp.zeros((len(OBJECTIVES),)) for k in ("ce_sum", "correct", "n_tokens")}
    keys = ["mlm_ce_sum", "mlm_correct", "mlm_tokens"]
    if layout == "nsp":
        keys += ["nsp_ce_sum", "nsp_correct", "nsp_examples"]
    return {k: jnp.zeros((), jnp.float32) for k in keys}


def loss_scales(cfg: Config, batch: dict) -> dict[str, jax.Array]:
    """What each summed loss is multiplied by: its weight over the step's predicted tokens
    (NSP: rows), counted over the whole batch whatever its leading axes."""
    layout = layout_of(cfg)
    if layout == "unified":
        tokens_R = jnp.sum(batch["loss_mask"], axis=-1).reshape(-1)
        ids_R = batch["objective_ids"].reshape(-1)
        tokens_O = jax.ops.segment_sum(tokens_R, ids_R, num_segments=len(OBJECTIVES))
        w_O = jnp.asarray(objective_weights(cfg))
        present_O = tokens_O > 0
        total_w = jnp.maximum(jnp.sum(jnp.where(present_O, w_O, 0.0)), 1e-9)
        share_O = jnp.where(present_O, w_O / total_w, 0.0)
        return {"tokens": share_O / jnp.maximum(tokens_O, 1)}
    out = {"mlm": 1.0 / jnp.maximum(jnp.sum(batch["masked_weights"]), 1.0)}
    if layout == "nsp":
        out["nsp"] = cfg.objective.nsp_weight / jnp.maximum(jnp.sum(batch["nsp_weights"]), 1.0)
    return out


def loss(params, mb, model, cfg: Config, scales, rng, deterministic: bool):
    """(scaled objective, summed metrics) of one micro-batch of ``(b, X)`` arrays."""
    layout = layout_of(cfg)
    rngs = {"dropout": rng}
    ls, zl = cfg.train.label_smoothing, cfg.train.z_loss
    if layout == "unified":
        out = model.apply(
            {"params": params},
            mb["inputs"],
            mb["positions"],
            mb["segment_ids"],
            prefix_len_B=mb["prefix_len"][:, 0],
            deterministic=deterministic,
            with_nsp=False,
            rngs=rngs,
        )
        return objective_lm_loss(
            out["mlm_logits"], mb["targets"], mb["loss_mask"], mb["objective_ids"][:, 0],
            scales["tokens"], ls, zl,
        )  # fmt: skip
    out = model.apply(
        {"params": params},
        mb["inputs"],
        mb["positions"],
        mb["segment_ids"],
        mb.get("token_types"),
        mb["masked_positions"],
        deterministic=deterministic,
        with_nsp=layout == "nsp",
        rngs=rngs,
    )
    mlm_obj, mlm = mlm_loss(out["mlm_logits"], mb["masked_ids"], mb["masked_weights"], ls, zl)
    objective = mlm_obj * scales["mlm"]
    metrics = {"mlm_ce_sum": mlm["ce_sum"], "mlm_correct": mlm["correct"]}
    metrics["mlm_tokens"] = mlm["n_tokens"]
    if layout == "nsp":
        nsp_obj, nsp = nsp_loss(out["nsp_logits"], mb["nsp_labels"][:, 0], mb["nsp_weights"][:, 0])
        objective = objective + nsp_obj * scales["nsp"]
        metrics.update(
            nsp_ce_sum=nsp["ce_sum"], nsp_correct=nsp["correct"], nsp_examples=nsp["n_examples"]
        )
    return objective, metrics


def summarize(cfg: Config, m: dict[str, Any], xp=jnp) -> dict[str, Any]:
    """Summed metrics -> reported ones (``loss`` as trained, without smoothing / z-loss).
    ``xp`` is jnp inside the step, np on the host (evaluation)."""
    layout = layout_of(cfg)
    if layout == "unified":
        n_O = xp.maximum(m["n_tokens"], 1.0)
        loss_O = m["ce_sum"] / n_O
        w_O = xp.asarray(objective_weights(cfg)) * (m["n_tokens"] > 0)
        return {
            "loss": xp.sum(w_O * loss_O) / xp.maximum(xp.sum(w_O), 1e-9),
            "accuracy": xp.sum(m["correct"]) / xp.maximum(xp.sum(m["n_tokens"]), 1.0),
            "n_tokens": xp.sum(m["n_tokens"]),
            "objective_loss": loss_O,
            "objective_tokens": m["n_tokens"],
        }
    mlm_n = xp.maximum(m["mlm_tokens"], 1.0)
    out = {
        "mlm_loss": m["mlm_ce_sum"] / mlm_n,
        "mlm_accuracy": m["mlm_correct"] / mlm_n,
        "n_tokens": m["mlm_tokens"],
    }
    out["loss"], out["accuracy"] = out["mlm_loss"], out["mlm_accuracy"]
    if layout == "nsp":
        nsp_n = xp.maximum(m["nsp_examples"], 1.0)
        out["nsp_loss"] = m["nsp_ce_sum"] / nsp_n
        out["nsp_accuracy"] = m["nsp_correct"] / nsp_n
        out["loss"] = out["mlm_loss"] + cfg.objective.nsp_weight * out["nsp_loss"]
    return out


def log_fields(cfg: Config, metrics: dict[str, Any]) -> dict[str, float]:
    """BERT: MLM / NSP losses and accuracies; unified: each present objective's loss."""
    out = {k: float(metrics[k]) for k in BERT_METRICS if k in metrics}
    if "objective_loss" in metrics:
        per_objective = zip(
            OBJECTIVES, metrics["objective_loss"], metrics["objective_tokens"], strict=True
        )
        out.update({f"{name}_loss": float(loss) for name, loss, n in per_objective if n > 0})
    return out


def eval_report(cfg: Config, totals: dict[str, Any]) -> dict[str, Any]:
    """BERT: ``val_loss`` (MLM + weighted NSP), ``mlm_loss``, ``mlm_accuracy``, ``perplexity``
    (of the MLM loss), ``nsp_loss``, ``nsp_accuracy``; unified: ``val_loss`` and
    ``<objective>_loss`` for each objective present. Both: ``accuracy``, ``tokens``."""
    out = summarize(cfg, totals, xp=np)
    report: dict[str, Any] = {"val_loss": float(out["loss"])}
    report.update(log_fields(cfg, out))
    if "mlm_loss" in report and "objective_loss" not in out:
        report["perplexity"] = float(np.exp(min(report["mlm_loss"], 50.0)))
    report["accuracy"] = float(out["accuracy"])
    report["tokens"] = int(out["n_tokens"])
    return report


class FrequencyBaseline(Baseline):
    """Always predicting the train split's most frequent non-special token, and the loss of its
    add-one-smoothed unigram distribution, at the masked positions evaluated."""

    def __init__(self, tokenizer, train):
        self.counts = train.unigram_counts(tokenizer.vocab_size).astype(np.float64)
        self.tokenizer = tokenizer
        self.targets: list[np.ndarray] = []

    def observe(self, batch: dict[str, np.ndarray]) -> None:
        if "masked_ids" in batch:  # unified rows predict in place or ahead: no baseline
            self.targets.append(batch["masked_ids"][batch["masked_weights"] > 0])

    def report(self, result: dict[str, Any]) -> dict[str, Any]:
        if not self.targets:
            return {}
        return frequency_baseline(self.counts, np.concatenate(self.targets), self.tokenizer)


def frequency_baseline(train_counts: np.ndarray, targets: np.ndarray, tokenizer) -> dict:
    """``mlm_frequency_accuracy`` and ``mlm_unigram_loss`` on ``targets`` (the masked tokens;
    specials are never masked)."""
    counts = train_counts.copy()
    specials = [tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
                tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id]  # fmt: skip
    counts[[i for i in specials if i is not None]] = 0
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + len(counts))
    return {
        "mlm_frequency_accuracy": float(np.mean(targets == int(np.argmax(counts)))),
        "mlm_unigram_loss": float(-log_p[targets].mean()),
    }


def baseline(cfg: Config, tokenizer, train, split) -> Baseline:
    return FrequencyBaseline(tokenizer, train)


def predicted_positions(cfg: Config) -> int:
    """Positions per row whose LM-head logits are computed: the ``max_predictions`` gathered
    slots for MLM, every position for the unified objective."""
    if layout_of(cfg) == "unified":
        return cfg.data.seq_len
    return resolve_max_predictions(cfg.objective, cfg.data.seq_len)


def synthetic_batch(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One global batch of random tokens with the keys and shapes of the config's layout
    (unified rows are all causal; MLM rows have ``max_predictions`` masked positions)."""
    batch, seq_len, vocab = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
    ones = np.ones((batch, seq_len), np.int32)
    tokens = rng.integers(7, vocab, (batch, seq_len), dtype=np.int32)
    if layout_of(cfg) == "unified":
        out = {
            "inputs": tokens,
            "targets": np.roll(tokens, -1, axis=1),
            "positions": positions,
            "segment_ids": ones,
            "loss_mask": np.ones((batch, seq_len), np.float32),
            "prefix_len": np.zeros((batch, 1), np.int32),
            "objective_ids": np.ones((batch, 1), np.int32),  # causal rows
        }
        return {k: out[k] for k in batch_keys(cfg)}
    p = predicted_positions(cfg)
    masked = np.sort(
        np.stack([rng.choice(np.arange(1, seq_len), p, replace=False) for _ in range(batch)]), 1
    ).astype(np.int32)
    out = {
        "inputs": tokens,
        "positions": positions,
        "segment_ids": ones,
        "masked_positions": masked,
        "masked_ids": np.take_along_axis(tokens, masked, axis=1),
        "masked_weights": np.ones((batch, p), np.float32),
        "token_types": (positions >= seq_len // 2).astype(np.int32),
        "nsp_labels": rng.integers(0, 2, (batch, 1), dtype=np.int32),
        "nsp_weights": np.ones((batch, 1), np.float32),
    }
    return {k: out[k] for k in batch_keys(cfg)}


def check_config(cfg: Config) -> None:
    """What a BERT run needs beyond the generic checks."""
    m, ob = cfg.model, cfg.objective
    if ob.mlm + ob.causal + ob.prefix_lm <= 0:
        raise ConfigError("objective.mlm, causal and prefix_lm are all 0; give one a share > 0")
    if ob.nsp and (ob.causal or ob.prefix_lm):
        raise ConfigError(
            "objective.nsp needs pure MLM; set objective.nsp=false for a unified run "
            f"(causal={ob.causal}, prefix_lm={ob.prefix_lm})"
        )
    if m.type_vocab_size < 2 and ob.nsp:
        raise ConfigError(f"model.type_vocab_size={m.type_vocab_size} must be >= 2 for NSP")
    if cfg.data.seq_len < 8:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is too short for BERT (>= 8)")
    if len(cfg.data.sources) > 1:
        raise ConfigError(
            f"data.sources has {len(cfg.data.sources)} sources; weighted mixtures are GPT-only "
            "for now: give model.family=bert one source (data.paths)"
        )


def masked_log_probs(model, params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Task scoring (``TaskScoring`` kind ``masked``, pseudo-log-likelihood): each row has one
    token masked at ``masked_positions`` ``(B, 1)``; returns ``log p(targets_Bx1)`` there and
    whether the target is the argmax."""
    out = model.apply(
        {"params": params},
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
        batch["token_types"],
        batch["masked_positions"],
        with_nsp=False,
    )
    logits_BxPxV = out["mlm_logits"].astype(jnp.float32)
    log_p_BxPxV = jax.nn.log_softmax(logits_BxPxV, axis=-1)
    targets_BxP = batch["targets"]
    log_p_BxP = jnp.take_along_axis(log_p_BxPxV, targets_BxP[..., None], axis=-1)[..., 0]
    return log_p_BxP, jnp.argmax(logits_BxPxV, axis=-1) == targets_BxP


BERT_FAMILY = Family(
    name="bert",
    build_model=BERT,
    batch_keys=lambda cfg, training: batch_keys(cfg),
    train_batches=train_batches,
    eval_batches=eval_batches,
    zero_metrics=zero_metrics,
    loss_scales=loss_scales,
    loss=loss,
    summarize=summarize,
    log_fields=log_fields,
    eval_report=eval_report,
    synthetic_batch=synthetic_batch,
    inspect_sample=masked_sample,
    baseline=baseline,
    report_fields=(
        ReportField("mlm_loss", "MLM loss"),
        ReportField("mlm_unigram_loss", "MLM unigram baseline"),
        ReportField("causal_loss", "causal LM loss"),
        ReportField("prefix_lm_loss", "prefix-LM loss"),
        ReportField("nsp_loss", "NSP loss"),
        ReportField("mlm_accuracy", "MLM accuracy", "percent"),
        ReportField("mlm_frequency_accuracy", "frequency baseline", "percent"),
        ReportField("nsp_accuracy", "NSP accuracy", "percent"),
    ),
    headline=("mlm_accuracy", "nsp_accuracy", "causal_loss", "prefix_lm_loss"),
    predicted_positions=predicted_positions,
    converters=(BERT_CONVERTER,),
    classifies=True,
    check_config=check_config,
    config_sections=(OBJECTIVE_SECTION,),  # cfg.objective (flaxlm/data/mlm_masks.py)
    task_scoring=TaskScoring("masked", masked_log_probs),  # multiple choice only
)
