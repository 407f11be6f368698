"""The family table is public API: a model family registered from a user's script (a
flax.linen module, its own batch maker and loss) trains, evaluates, checkpoints and resumes
with flaxlm's trainer, exactly as the README shows."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import linen as nn

from flaxlm.config import ConfigError
from flaxlm.families import (
    GPT_FAMILY,
    family_of,
    get_family,
    register_family,
    registered_families,
)
from flaxlm.tools.evaluate import evaluate
from flaxlm.train import train


class RunningMeanLM(nn.Module):
    """Each position predicts the next token from its own embedding and the mean embedding of
    the tokens so far (a bigram model with a bag-of-words context)."""

    vocab: int
    width: int = 32

    @nn.compact
    def __call__(self, tokens_BxL):
        x_BxLxD = nn.Embed(self.vocab, self.width)(tokens_BxL)
        counts_L = jnp.arange(1, tokens_BxL.shape[1] + 1, dtype=jnp.float32)
        mean_BxLxD = jnp.cumsum(x_BxLxD, axis=1) / counts_L[None, :, None]
        h_BxLx2D = jnp.concatenate([x_BxLxD, mean_BxLxD], axis=-1)
        return nn.Dense(self.vocab)(nn.gelu(nn.Dense(2 * self.width)(h_BxLx2D)))


class Windows:
    """Step-indexed windows of the token stream: the batch of step k is a function of
    (seed, k); the eval walk goes through the split in order."""

    def __init__(self, split, seq_len: int, batch: int, seed: int):
        self.tokens, self.seq_len, self.batch_rows, self.seed = split.tokens, seq_len, batch, seed
        self.n_examples = (len(self.tokens) - 1) // seq_len

    def _rows(self, starts):
        idx = np.asarray(starts)[:, None] + np.arange(self.seq_len + 1)
        window = self.tokens[idx].astype(np.int32)
        ones = np.ones((len(starts), self.seq_len), np.float32)
        return {"inputs": window[:, :-1], "targets": window[:, 1:], "loss_mask": ones}

    def batch(self, step: int, process_index: int = 0, process_count: int = 1):
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, self.batch_rows)
        per = self.batch_rows // process_count
        return self._rows(starts[process_index * per : (process_index + 1) * per])

    def eval_batches(self, batch_size, max_batches=0, process_index=0, process_count=1):
        n = -(-self.n_examples // batch_size)
        for b in range(min(n, max_batches) if max_batches else n):
            ids = np.arange(b * batch_size, (b + 1) * batch_size) % self.n_examples
            per = batch_size // process_count
            yield self._rows(ids[process_index * per : (process_index + 1) * per] * self.seq_len)


def loss(params, mb, model, cfg, scale, rng, deterministic):
    """(objective x scale, summed metrics) — the contract of flaxlm/families/base.py."""
    logits_BxLxV = model.apply({"params": params}, mb["inputs"])
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, mb["targets"])
    mask_BxL = mb["loss_mask"]
    correct_BxL = (jnp.argmax(logits_BxLxV, -1) == mb["targets"]) * mask_BxL
    metrics = {"ce_sum": jnp.sum(ce_BxL * mask_BxL), "correct": jnp.sum(correct_BxL),
               "n_tokens": jnp.sum(mask_BxL)}  # fmt: skip
    return metrics["ce_sum"] * scale, metrics


def register_running_mean() -> None:
    register_family(
        dataclasses.replace(
            GPT_FAMILY,  # its metrics, eval report and baseline fit this model too
            name="running_mean",
            build_model=lambda m: RunningMeanLM(m.vocab_size),
            batch_keys=lambda cfg, training: ("inputs", "targets", "loss_mask"),
            train_batches=lambda data, cfg, r: Windows(data.train, cfg.data.seq_len, r.full, 0),
            eval_batches=lambda split, cfg, tok, b: Windows(split, cfg.data.seq_len, b, 0),
            loss=loss,
            converters=(),
            generates=False,
        ),
        replace=True,
    )


def test_a_registered_family_trains_evaluates_and_resumes(small_corpus, tiny_cache_dir, tmp_path):
    register_running_mean()
    assert "running_mean" in registered_families()
    run_dir = tmp_path / "run"
    overrides = ("model.family=running_mean", "train.eval_every=0", "checkpoint.every=50")
    cfg = tiny_config(
        small_corpus, tiny_cache_dir, run_dir, "train.steps=150", "optim.lr=1e-2", *overrides
    )
    result = train(cfg)
    first, last = result.history[0]["loss"], result.evals[-1]["val_loss"]
    assert first > math.log(cfg.model.vocab_size) - 0.5  # untrained: about uniform
    assert last < first - 0.5, (first, last)
    # A checkpoint tool on the user's family: the same batches give the loop's number, and
    # the run beats the unigram baseline flaxlm computes for it.
    report = evaluate(run_dir, max_batches=cfg.train.eval_batches)
    assert report["step"] == 150
    assert math.isclose(report["val_loss"], last, rel_tol=1e-5)
    assert report["gain_over_unigram"] > 0
    # Checkpoints resume into the user's model.
    more = tiny_config(
        small_corpus, tiny_cache_dir, run_dir, "train.steps=160", "optim.lr=1e-2", *overrides
    )
    resumed = train(more)
    assert resumed.resumed_from == 150 and resumed.step == 160


def test_unknown_family_is_one_line_naming_the_registered_ones():
    with pytest.raises(ConfigError, match="model.family='nope' is not one of gpt, bert"):
        get_family("nope")


def test_family_checks_run_when_the_family_is_resolved(small_corpus, tiny_cache_dir, tmp_path):
    cfg = tiny_config(small_corpus, tiny_cache_dir, tmp_path, "model.norm_placement=post")
    with pytest.raises(ConfigError, match="GPT is pre-LN"):
        family_of(cfg)


def test_the_built_in_families_are_not_replaced_by_accident():
    with pytest.raises(ValueError, match="already registered"):
        register_family(dataclasses.replace(GPT_FAMILY))
    assert get_family("gpt") is GPT_FAMILY
    assert jax.tree.leaves(GPT_FAMILY.synthetic_batch.__name__)  # a real entry, not a stub
