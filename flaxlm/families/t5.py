"""The ``t5`` family: an encoder–decoder (flaxlm/models/t5.py) trained on T5's span corruption
or on (input, target) pairs (the ``seq2seq`` section, flaxlm/data/span_corruption.py).

Batches carry the encoder row and the decoder row separately (flaxlm/data/seq2seq_batches.py:
``encoder_ids``, ``encoder_segment_ids``, ``encoder_positions``, ``decoder_input_ids``,
``decoder_target_ids``, ``decoder_segment_ids``, ``decoder_positions``,
``decoder_loss_mask``). The loss is the cross-entropy of every target token
(``decoder_loss_mask`` 1), a mean over the step's target tokens; accuracy is the share of
target tokens predicted exactly. ``flaxlm eval`` compares with the unigram baseline of the
same targets: the loss of the best context-free predictor of the evaluated target tokens
(their own frequencies) and the accuracy of always predicting the most frequent one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.config import Config, ConfigError, ConfigSection
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.span_corruption import SEQ2SEQ_SECTION, resolve_target_len
from flaxlm.families.base import Baseline, Family, FlopCount, ReportField, TaskScoring
from flaxlm.hf.t5 import T5_CONVERTER
from flaxlm.losses.objectives import causal_lm_loss
from flaxlm.models.flop_count import attention_params, mlp_params
from flaxlm.models.t5 import T5, T5Options, decoder_layers

ENCODER_KEYS = ("encoder_ids", "encoder_segment_ids", "encoder_positions")
DECODER_KEYS = ("decoder_input_ids", "decoder_target_ids", "decoder_segment_ids",
                "decoder_positions", "decoder_loss_mask")  # fmt: skip
T5_BATCH_KEYS = ENCODER_KEYS + DECODER_KEYS


def check_t5_options(cfg: Config) -> None:
    """The ``model.t5`` ranges and what T5's blocks need from the shared model keys."""
    m, t5 = cfg.model, cfg.model.t5
    if m.family != "t5":
        return
    if t5.decoder_layers < 0:
        raise ConfigError(
            f"model.t5.decoder_layers={t5.decoder_layers} must be >= 0 (0 = n_layers)"
        )
    if t5.relative_buckets < 4 or t5.relative_buckets % 2:
        raise ConfigError(
            f"model.t5.relative_buckets={t5.relative_buckets} must be even and >= 4 (T5: 32)"
        )
    if t5.relative_max_distance <= t5.relative_buckets // 4:
        raise ConfigError(
            f"model.t5.relative_max_distance={t5.relative_max_distance} must exceed "
            f"relative_buckets / 4 = {t5.relative_buckets // 4} (T5: 128)"
        )
    for key, needed in (("norm", "rmsnorm"), ("use_bias", False)):
        if getattr(m, key) != needed:
            raise ConfigError(f"model.{key}={getattr(m, key)!r}: t5 needs {needed!r}")
    if m.activation == "swiglu":
        raise ConfigError(
            "model.activation='swiglu': t5 gates with model.t5.gated_mlp; use gelu or relu"
        )
    if t5.gated_mlp and m.moe.num_experts:
        raise ConfigError(
            "model.t5.gated_mlp=true with model.moe.num_experts > 0: t5 experts are ungated "
            "(Switch Transformer); set model.t5.gated_mlp=false"
        )
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not a multiple of n_heads={m.n_heads}")


# Registered by the family entry: ``cfg.model.t5``.
T5_SECTION = ConfigSection("model.t5", T5Options, check=check_t5_options)


def batch_keys(cfg: Config, training: bool) -> tuple[str, ...]:
    return T5_BATCH_KEYS


def train_batches(prepared, cfg: Config, ramp: BatchRamp):
    """Span-corruption batches (flaxlm/data/seq2seq_batches.py) of the run's train split."""
    from flaxlm.data.seq2seq_batches import make_seq2seq_batches

    return make_seq2seq_batches(prepared.train, cfg, prepared.tokenizer, ramp.full, ramp=ramp)


def eval_batches(split, cfg: Config, tokenizer, batch_size: int):
    from flaxlm.data.seq2seq_batches import make_seq2seq_batches

    return make_seq2seq_batches(split, cfg, tokenizer, batch_size, shuffle=False)


def zero_metrics(cfg: Config, batch: dict) -> dict[str, jax.Array]:
    return {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "correct", "n_tokens")}


def loss_scales(cfg: Config, batch: dict) -> jax.Array:
    """One over the target tokens of the whole step."""
    return 1.0 / jnp.maximum(jnp.sum(batch["decoder_loss_mask"].astype(jnp.float32)), 1.0)


def loss(params, mb, model, cfg: Config, scale, rng, deterministic: bool):
    """(scaled objective, summed metrics) of one micro-batch: teacher-forced target tokens."""
    logits_BxTxV = model.apply(
        {"params": params},
        mb["encoder_ids"],
        mb["decoder_input_ids"],
        mb["encoder_segment_ids"],
        mb["decoder_segment_ids"],
        mb["encoder_positions"],
        mb["decoder_positions"],
        deterministic=deterministic,
        rngs={"dropout": rng},
    )
    objective, metrics = causal_lm_loss(
        logits_BxTxV, mb["decoder_target_ids"], mb["decoder_loss_mask"],
        cfg.train.label_smoothing, cfg.train.z_loss,
    )  # fmt: skip
    return objective * scale, metrics


def summarize(cfg: Config, m: dict[str, Any], xp=jnp) -> dict[str, Any]:
    n = xp.maximum(m["n_tokens"], 1.0)
    return {"loss": m["ce_sum"] / n, "accuracy": m["correct"] / n, "n_tokens": m["n_tokens"]}


def eval_report(cfg: Config, totals: dict[str, Any]) -> dict[str, Any]:
    """``val_loss`` (target-token loss), ``perplexity``, ``accuracy``, ``tokens``."""
    out = summarize(cfg, totals, xp=np)
    loss_value = float(out["loss"])
    return {
        "val_loss": loss_value,
        "perplexity": float(np.exp(min(loss_value, 50.0))),
        "accuracy": float(out["accuracy"]),
        "tokens": int(out["n_tokens"]),
    }


class TargetUnigramBaseline(Baseline):
    """The evaluated target tokens' own unigram distribution: its cross-entropy on them (no
    context-free predictor does better) and the accuracy of always predicting the most
    frequent target token."""

    def __init__(self) -> None:
        self.targets: list[np.ndarray] = []

    def observe(self, batch: dict[str, np.ndarray]) -> None:
        keep = np.asarray(batch["decoder_loss_mask"]) > 0
        self.targets.append(np.asarray(batch["decoder_target_ids"])[keep])

    def report(self, result: dict[str, Any]) -> dict[str, Any]:
        return unigram_baseline(np.concatenate(self.targets or [np.zeros(0, np.int64)]), result)


def unigram_baseline(targets: np.ndarray, result: dict[str, Any]) -> dict[str, Any]:
    """``unigram_loss``, ``gain_over_unigram`` (unigram minus ``result["val_loss"]``) and
    ``unigram_accuracy`` of ``targets`` (1-D token ids); empty for no targets."""
    if targets.size == 0:
        return {}
    _, counts = np.unique(targets, return_counts=True)
    p = counts / counts.sum()
    loss_value = float(-(p * np.log(p)).sum())
    return {
        "unigram_loss": loss_value,
        "gain_over_unigram": loss_value - result["val_loss"],
        "unigram_accuracy": float(p.max()),
    }


def baseline(cfg: Config, tokenizer, train, split) -> Baseline:
    return TargetUnigramBaseline()


def synthetic_batch(cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One global batch of random tokens: one example per row, encoder ``data.seq_len`` and
    decoder the target length, every target token counted."""
    batch, vocab = cfg.train.batch_size, cfg.model.vocab_size
    enc_len, dec_len = cfg.data.seq_len, resolve_target_len(cfg)

    def positions(length: int) -> np.ndarray:
        return np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()

    targets = rng.integers(7, vocab, (batch, dec_len), dtype=np.int32)
    decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_ids": rng.integers(7, vocab, (batch, enc_len), dtype=np.int32),
        "encoder_segment_ids": np.ones((batch, enc_len), np.int32),
        "encoder_positions": positions(enc_len),
        "decoder_input_ids": decoder_inputs,
        "decoder_target_ids": targets,
        "decoder_segment_ids": np.ones((batch, dec_len), np.int32),
        "decoder_positions": positions(dec_len),
        "decoder_loss_mask": np.ones((batch, dec_len), np.float32),
    }


def inspect_sample(cfg: Config, prepared, batch: dict, rows: int) -> dict:
    """The first ``rows`` rows as text: each packed example's encoder input and target."""
    out = []
    for r in range(min(rows, len(batch["encoder_ids"]))):
        enc, dec = batch["encoder_segment_ids"][r], batch["decoder_segment_ids"][r]
        for seg in [s for s in np.unique(enc) if s > 0]:
            ids = batch["encoder_ids"][r][enc == seg]
            target = batch["decoder_target_ids"][r][dec == seg]
            text, target_text = (
                decode_with_sentinels(cfg, prepared.tokenizer, x) for x in (ids, target)
            )
            out.append({"row": r, "segment": int(seg), "input": text, "target": target_text})
    return {"examples": out}


def decode_with_sentinels(cfg: Config, tok, ids: np.ndarray) -> str:
    """Text of ids; the sentinels past the tokenizer's vocabulary as ``<extra_id_N>``
    (``<extra_id_0>`` = the highest, flaxlm/data/span_corruption.py)."""
    first_sentinel = tok.vocab_size + cfg.seq2seq.extra_ids - 1
    parts, run = [], []
    for i in np.asarray(ids).tolist():
        if i < tok.vocab_size:
            run.append(i)
            continue
        parts += [tok.decode(run), f"<extra_id_{first_sentinel - i}>"]
        run = []
    parts.append(tok.decode(run))
    return "".join(parts)


def predicted_positions(cfg: Config) -> int:
    return resolve_target_len(cfg)


T5_FLOPS = (
    "[S*sum_e 6*(A + M) + Le*12*d*S^2 + T*sum_d 6*(A + 2*d^2 + M) + Ld*12*d*T*(T + S)"
    " + S*Ld*12*d*d_kv] / S, A = 2*d^2 + 2*d*d_kv, M = MLP (3*d*F gated, else 2*d*F)"
)


def flop_count(cfg: Config) -> FlopCount:
    """Training FLOPs per encoder token (the trainer and ``bench`` count a row's
    ``data.seq_len`` = S encoder tokens), PaLM's convention: 6 x the matmul parameters each
    token runs through, plus 12 d per (query, key) pair for the score and value matmuls
    (forward + backward; no discount for causal masking, as flaxlm's decoder formula).

    Per example: the encoder's S tokens run ``Le`` blocks (attention ``A``, MLP ``M``) and
    attend to S keys; the decoder's T = target-length tokens run ``Ld`` blocks (``A``, the
    cross-attention's query and output ``2 d^2``, ``M``) and attend to T keys (self) and S
    keys (cross); each decoder block projects the S encoder outputs to cross keys and values
    (``2 d d_kv`` per encoder token); the head ``d V`` runs on the T target tokens. The
    relative position bias and the embeddings are lookups, not matmuls."""
    m = cfg.model
    d, enc, dec = m.d_model, cfg.data.seq_len, resolve_target_len(cfg)
    attn, kv = attention_params(m), attention_params(m) - 2 * d * d
    gated = m.t5.gated_mlp
    encoder = sum(6 * enc * (attn + mlp_params(m, i, gated)) + 12 * d * enc * enc
                  for i in range(m.n_layers))  # fmt: skip
    decoder = sum(
        6 * dec * (attn + 2 * d * d + mlp_params(m, i, gated))
        + 12 * d * dec * (dec + enc)
        + 6 * enc * kv
        for i in range(decoder_layers(m))
    )
    return FlopCount(
        body=(encoder + decoder) / enc,
        head=6.0 * d * m.vocab_size * dec / enc,
        formula=T5_FLOPS,
        head_formula=f"+ 6*d*V * T/S (S={enc}, T={dec})",
    )


def seq2seq_log_probs(model, params, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Task scoring (``TaskScoring`` kind ``seq2seq``, flaxlm/tasks/seq2seq.py): rows laid out
    as training batches (``encoder_*`` ``(B, S)``, ``decoder_*`` ``(B, T)``); returns
    ``log p(decoder_target_ids_BxT | encoder row, targets before)`` and whether each target
    is the argmax, both ``(B, T)``."""
    logits_BxTxV = model.apply(
        {"params": params},
        batch["encoder_ids"],
        batch["decoder_input_ids"],
        batch["encoder_segment_ids"],
        batch["decoder_segment_ids"],
        batch["encoder_positions"],
        batch["decoder_positions"],
    )
    log_p_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    targets_BxT = batch["decoder_target_ids"]
    log_p_BxT = jnp.take_along_axis(log_p_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return log_p_BxT, jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT


T5_FAMILY = Family(
    name="t5",
    build_model=T5,
    batch_keys=batch_keys,
    train_batches=train_batches,
    eval_batches=eval_batches,
    zero_metrics=zero_metrics,
    loss_scales=loss_scales,
    loss=loss,
    summarize=summarize,
    log_fields=lambda cfg, metrics: {},
    eval_report=eval_report,
    synthetic_batch=synthetic_batch,
    inspect_sample=inspect_sample,
    baseline=baseline,
    report_fields=(
        ReportField("perplexity", "perplexity", "number"),
        ReportField("accuracy", "target accuracy", "percent"),
        ReportField("unigram_loss", "unigram baseline"),
        ReportField("gain_over_unigram", "gain over unigram"),
        ReportField("unigram_accuracy", "unigram accuracy", "percent"),
    ),
    headline=("perplexity",),
    predicted_positions=predicted_positions,
    converters=(T5_CONVERTER,),
    generates=True,  # flaxlm generate: the prompt is the encoder input
    encoder_decoder=True,  # (flaxlm/tools/seq2seq_generate.py; finetune: seq2seq_finetune.py)
    check_config=lambda cfg: None,
    config_sections=(T5_SECTION, SEQ2SEQ_SECTION),
    flop_count=flop_count,
    task_scoring=TaskScoring(
        "seq2seq", seq2seq_log_probs, ("loglikelihood", "loglikelihood_rolling", "generate_until")
    ),
)
