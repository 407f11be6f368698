"""Train and eval steps for ``model.family: bert``: MLM (+ NSP), and the unified objective.

Chosen by :func:`flaxlm.train.step.make_train_step` from the config; sharding, donation,
gradient accumulation, controls (rollback cool-down, chaos) and the optimizer update are those
of the GPT step. What differs is the loss:

- BERT (``nsp`` / ``mlm`` layouts): ``loss = mlm_loss + nsp_weight * nsp_loss``, the MLM loss
  a mean over the batch's masked positions (logits only at those, gathered), the NSP loss a
  mean over its rows.
- unified: each objective's mean token loss, weighted by its share; an objective absent from a
  batch drops out and the others' weights are renormalised.

The denominators are counted over the *whole* batch (all micro-batches) before the gradients
are taken, so gradient accumulation gives the same update as one big batch. The guard watches
the total ``loss``; ``mlm_loss``, ``mlm_accuracy``, ``nsp_loss``, ``nsp_accuracy`` (BERT) and
``<objective>_loss`` (unified) are logged beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training.train_state import TrainState
from jax.sharding import Mesh

from flaxlm.config import Config
from flaxlm.data.masked import OBJECTIVES, layout_of
from flaxlm.objectives import mlm_loss, nsp_loss, objective_lm_loss
from flaxlm.train.batches import put_eval_batch
from flaxlm.train.step import apply_update

# Scalar train metrics the loop writes to metrics.jsonl besides loss / accuracy / lr / grad_norm.
BERT_METRICS = ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy")


def objective_weights(cfg: Config) -> np.ndarray:
    """(3,) the unified shares of mlm, causal, prefix_lm."""
    ob = cfg.objective
    return np.array([ob.mlm, ob.causal, ob.prefix_lm], dtype=np.float32)


def _denominators(batch: dict[str, jax.Array], layout: str) -> dict[str, jax.Array]:
    """Predicted tokens (and NSP rows) of the whole batch, whatever its leading axes."""
    if layout == "unified":
        tokens_R = jnp.sum(batch["loss_mask"], axis=-1).reshape(-1)
        ids_R = batch["objective_ids"].reshape(-1)
        return {"tokens": jax.ops.segment_sum(tokens_R, ids_R, num_segments=len(OBJECTIVES))}
    out = {"mlm": jnp.sum(batch["masked_weights"])}
    if layout == "nsp":
        out["nsp"] = jnp.sum(batch["nsp_weights"])
    return out


def _scales(cfg: Config, layout: str, denoms: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """What each summed loss is multiplied by, so the micro-batch sums add up to the loss."""
    if layout == "unified":
        w_O = jnp.asarray(objective_weights(cfg))
        present_O = denoms["tokens"] > 0
        total_w = jnp.maximum(jnp.sum(jnp.where(present_O, w_O, 0.0)), 1e-9)
        share_O = jnp.where(present_O, w_O / total_w, 0.0)
        return {"tokens": share_O / jnp.maximum(denoms["tokens"], 1)}
    out = {"mlm": 1.0 / jnp.maximum(denoms["mlm"], 1.0)}
    if layout == "nsp":
        out["nsp"] = cfg.objective.nsp_weight / jnp.maximum(denoms["nsp"], 1.0)
    return out


def _loss_on(params, mb, model: nn.Module, cfg: Config, layout: str, scales, rng, deterministic):
    """(scaled objective, summed metrics) of one micro-batch of ``(b, X)`` arrays."""
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


def summarize(cfg: Config, layout: str, m: dict[str, Any], xp=jnp) -> dict[str, Any]:
    """Summed metrics -> reported ones (``loss`` as trained, without smoothing / z-loss).
    ``xp`` is jnp inside the step, np on the host (evaluation)."""
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


def _zero_metrics(layout: str) -> dict[str, jax.Array]:
    if layout == "unified":
        return {k: jnp.zeros((len(OBJECTIVES),)) for k in ("ce_sum", "correct", "n_tokens")}
    keys = ["mlm_ce_sum", "mlm_correct", "mlm_tokens"]
    if layout == "nsp":
        keys += ["nsp_ce_sum", "nsp_correct", "nsp_examples"]
    return {k: jnp.zeros((), jnp.float32) for k in keys}


def make_train_step(
    model: nn.Module, cfg: Config, schedule: optax.Schedule
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``(state, batch, controls) -> (state, metrics)`` for a BERT / unified config; the batch
    holds ``(A, b, X)`` arrays with the keys of :func:`flaxlm.data.masked.batch_keys`."""
    base_rng = jax.random.key(cfg.train.seed)
    deterministic = cfg.model.dropout == 0.0
    layout = layout_of(cfg)
    grad_fn = jax.value_and_grad(_loss_on, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array], controls: dict[str, jax.Array]):
        step_rng = jax.random.fold_in(jax.random.fold_in(base_rng, 1), state.step)
        scales = _scales(cfg, layout, _denominators(batch, layout))

        def micro(carry, xs):
            grads_acc, metrics_acc = carry
            index, mb = xs
            rng = jax.random.fold_in(step_rng, index)
            (_, metrics), grads = grad_fn(
                state.params, mb, model, cfg, layout, scales, rng, deterministic
            )
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
            return (grads_acc, metrics_acc), None

        zeros = (jax.tree.map(jnp.zeros_like, state.params), _zero_metrics(layout))
        n_micro = batch["inputs"].shape[0]
        if n_micro == 1:
            (grads, metrics), _ = micro(zeros, (0, jax.tree.map(lambda x: x[0], batch)))
        else:
            (grads, metrics), _ = jax.lax.scan(micro, zeros, (jnp.arange(n_micro), batch))
        poison = jnp.where(controls["inject_nan"], jnp.nan, 0.0)
        grads = jax.tree.map(lambda g: g + poison, grads)
        new_state, grad_norm = apply_update(state, grads, controls)
        out = summarize(cfg, layout, metrics)
        out["loss"] = out["loss"] + poison
        out["grad_norm"] = grad_norm
        out["lr"] = schedule(state.step) * controls["lr_scale"]
        return new_state, out

    return train_step


def make_eval_step(model: nn.Module, cfg: Config) -> Callable[..., dict[str, jax.Array]]:
    """``(params, batch) -> summed metrics`` for one ``(b, X)`` batch."""
    layout = layout_of(cfg)

    def eval_step(params, batch: dict[str, jax.Array]):
        ones = {"tokens": jnp.ones((len(OBJECTIVES),)), "mlm": 1.0, "nsp": 1.0}
        _, metrics = _loss_on(params, batch, model, cfg, layout, ones, jax.random.key(0), True)
        return metrics

    return eval_step


def evaluate_masked_batches(
    eval_step: Callable, params, local_batches, mesh: Mesh, cfg: Config
) -> dict[str, Any]:
    """Evaluation over an iterable of this process's rows (padding rows carry zero weights).

    BERT: ``val_loss`` (MLM + weighted NSP), ``mlm_loss``, ``mlm_accuracy``, ``perplexity``
    (of the MLM loss), ``accuracy`` (= MLM accuracy), ``tokens`` (masked positions),
    ``nsp_loss``, ``nsp_accuracy``. Unified: ``val_loss``, ``accuracy``, ``tokens`` and
    ``<objective>_loss`` for each objective present.
    """
    layout = layout_of(cfg)
    pending = [eval_step(params, put_eval_batch(batch, mesh)) for batch in local_batches]
    totals = jax.tree.map(np.zeros_like, jax.device_get(_zero_metrics(layout)))
    for metrics in jax.device_get(pending):  # one sync for the whole pass
        totals = jax.tree.map(lambda a, b: a + np.asarray(b, np.float64), totals, metrics)
    out = summarize(cfg, layout, totals, xp=np)
    report: dict[str, Any] = {"val_loss": float(out["loss"])}
    if layout == "unified":
        for name, loss, n in zip(
            OBJECTIVES, out["objective_loss"], out["objective_tokens"], strict=True
        ):
            if n > 0:
                report[f"{name}_loss"] = float(loss)
    else:
        report["mlm_loss"] = float(out["mlm_loss"])
        report["mlm_accuracy"] = float(out["mlm_accuracy"])
        report["perplexity"] = float(np.exp(min(float(out["mlm_loss"]), 50.0)))
        if layout == "nsp":
            report["nsp_loss"] = float(out["nsp_loss"])
            report["nsp_accuracy"] = float(out["nsp_accuracy"])
    report["accuracy"] = float(out["accuracy"])
    report["tokens"] = int(out["n_tokens"])
    return report
