"""Checkpoint tools: loading, evaluation against a by-hand computation, exact greedy sampling."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TRAINED_RUN_STEPS

from flaxlm.checkpoint.manager import CheckpointError
from flaxlm.data import CausalBatches, prepare_data, unigram_cross_entropy
from flaxlm.tools.evaluate import evaluate
from flaxlm.tools.generate import GenerateOptions, generate, generate_for
from flaxlm.tools.load import load_checkpoint


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load_checkpoint(trained_run)


def _continue(loaded, prompt_ids: list[int], n: int, **options) -> list[int]:
    """One prompt's new ids through the checkpoint-level :func:`generate_for`."""
    return generate_for(loaded, [prompt_ids], GenerateOptions(n, **options)).ids[0]


def test_load_checkpoint_from_a_run_dir_or_one_checkpoint(trained_run, loaded):
    assert loaded.step == TRAINED_RUN_STEPS
    assert loaded.meta["data_index"] == TRAINED_RUN_STEPS
    assert loaded.cfg.train.steps == TRAINED_RUN_STEPS
    assert loaded.tokenizer.model_bytes == (trained_run / "tokenizer.model").read_bytes()

    older = load_checkpoint(trained_run / "checkpoints" / "100")
    assert older.step == 100
    assert older.meta["data_index"] == 100
    assert not np.array_equal(
        jax.device_get(older.params["token_embed"]["embedding"]),
        jax.device_get(loaded.params["token_embed"]["embedding"]),
    )

    with pytest.raises(CheckpointError, match="neither a run directory"):
        load_checkpoint(trained_run / "checkpoints")
    with pytest.raises(CheckpointError, match="neither a run directory"):
        load_checkpoint(trained_run / "no-such-dir")


def _manual_eval(loaded, tokens_split) -> dict[str, float]:
    """The same batches through ``model.apply``, with the masked cross-entropy in NumPy."""
    cfg = loaded.cfg
    batch_size = cfg.train.batch_size // cfg.train.grad_accum
    batches = CausalBatches(tokens_split, cfg.data.seq_len, batch_size, seed=0, shuffle=False)
    apply = jax.jit(lambda params, x, pos, seg: loaded.model.apply({"params": params}, x, pos, seg))
    ce_sum = correct = n_tokens = 0.0
    for batch in batches.eval_batches(batch_size):
        logits_BxLxV = np.asarray(
            apply(loaded.params, batch["inputs"], batch["positions"], batch["segment_ids"]),
            dtype=np.float64,
        )
        peak_BxL = logits_BxLxV.max(-1)
        lse_BxL = peak_BxL + np.log(np.exp(logits_BxLxV - peak_BxL[..., None]).sum(-1))
        target_BxL = np.take_along_axis(logits_BxLxV, batch["targets"][..., None], -1)[..., 0]
        mask_BxL = batch["loss_mask"].astype(np.float64)
        ce_sum += float(((lse_BxL - target_BxL) * mask_BxL).sum())
        correct += float(((logits_BxLxV.argmax(-1) == batch["targets"]) * mask_BxL).sum())
        n_tokens += float(mask_BxL.sum())
    return {"val_loss": ce_sum / n_tokens, "accuracy": correct / n_tokens, "tokens": n_tokens}


def test_evaluate_matches_a_manual_computation(loaded):
    report = evaluate(loaded)
    data = prepare_data(loaded.cfg.data, loaded.cfg.model.vocab_size, False, loaded.tokenizer)
    manual = _manual_eval(loaded, data.val)

    assert report["step"] == TRAINED_RUN_STEPS
    assert report["split"] == "val"
    assert report["tokens"] == manual["tokens"]
    assert report["val_loss"] == pytest.approx(manual["val_loss"], abs=1e-5)
    assert report["accuracy"] == pytest.approx(manual["accuracy"], abs=1e-6)
    assert report["perplexity"] == pytest.approx(math.exp(report["val_loss"]), rel=1e-12)
    # The baseline: the same tokens under the train split's unigram distribution.
    unigram = unigram_cross_entropy(data.train, data.val, loaded.tokenizer.vocab_size)
    assert report["unigram_loss"] == pytest.approx(unigram, rel=1e-12)
    assert report["gain_over_unigram"] == pytest.approx(unigram - report["val_loss"])
    assert report["gain_over_unigram"] > 0  # the run did learn more than token frequencies


def test_evaluate_other_text_and_limits(loaded, small_corpus, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text((small_corpus / "hamlet.txt").read_text()[:20_000])
    report = evaluate(loaded, [str(text)])
    assert report["data"] == [str(text)]
    assert "unigram_loss" not in report  # no train split to draw a baseline from
    assert 0 < report["val_loss"] < 10
    assert report["tokens"] > 1000

    # max_batches limits the pass; batch_size sets the rows per batch.
    few = evaluate(loaded, max_batches=2, batch_size=4)
    assert few["tokens"] <= 2 * 4 * loaded.cfg.data.seq_len
    train_split = evaluate(loaded, split="train", max_batches=1)
    assert train_split["split"] == "train"
    with pytest.raises(ValueError, match="split='test'"):
        evaluate(loaded, split="test")


def _reference_greedy(loaded, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding the obvious way: the unpadded context (at most seq_len tokens, the
    window the model was trained on) through ``model.apply``, argmax of the last position."""
    seq_len = loaded.cfg.data.seq_len
    apply = _jitted_apply(loaded.model)  # compiles once per context length
    tokens, out = list(prompt_ids), []
    for _ in range(n):
        context_1xT = jnp.asarray([tokens[-seq_len:]], dtype=jnp.int32)
        logits_1xTxV = apply(loaded.params, context_1xT)
        token = int(jnp.argmax(logits_1xTxV[0, -1]))
        tokens.append(token)
        out.append(token)
    return out


@functools.cache
def _jitted_apply(model):
    return jax.jit(lambda params, tokens_1xT: model.apply({"params": params}, tokens_1xT))


@pytest.mark.parametrize("params", ["trained", "noisy"])
def test_greedy_generation_equals_the_unpadded_reference(loaded, params):
    """``generate_for`` (however it gets there: a padded fixed window, a KV cache, a sliding
    window once the context is full) must pick the tokens the plain computation picks. The
    trained tiny model soon repeats one token, so the same weights plus N(0, 0.5^2) noise,
    whose argmax jumps around, check it on varied contexts too."""
    if params == "noisy":
        rng = np.random.default_rng(1)
        noisy = jax.tree.map(
            lambda x: np.asarray(x) + 0.5 * rng.standard_normal(x.shape, np.float32), loaded.params
        )
        noisy = jax.device_put(noisy, loaded.params_sharding)  # same shardings: no recompiles
        loaded = dataclasses.replace(loaded, params=noisy)
    seq_len = loaded.cfg.data.seq_len
    text = "HAMLET.\nTo be, or not to be, that is the question:\nWhether 'tis nobler"
    prompt = loaded.tokenizer.encode(text)[: seq_len - 2]
    n = 6  # the context fills the window, then slides
    got = _continue(loaded, prompt, n, temperature=0.0, stop_at_eos=False)
    assert got == _reference_greedy(loaded, prompt, n)
    if params == "noisy":
        assert len(set(got)) > 2
        # A short context (the empty prompt starts from </s>) goes through the same window.
        assert _continue(loaded, [], 2, stop_at_eos=False) == _reference_greedy(
            loaded, [loaded.tokenizer.eos_id], 2
        )
    else:
        # ``generate`` is text in, text out around ``generate_for``.
        ids = _continue(loaded, loaded.tokenizer.encode(text), n)
        assert generate(loaded, text, max_new_tokens=n) == loaded.tokenizer.decode(ids)


def test_temperature_sampling_is_reproducible_per_seed(loaded):
    prompt = loaded.tokenizer.encode("ROMEO.\n")
    first = _continue(loaded, prompt, 24, temperature=1.0, seed=3, stop_at_eos=False)
    again = _continue(loaded, prompt, 24, temperature=1.0, seed=3, stop_at_eos=False)
    other = _continue(loaded, prompt, 24, temperature=1.0, seed=4, stop_at_eos=False)
    assert first == again
    assert first != other
    assert all(0 <= t < loaded.tokenizer.vocab_size for t in first)
    with pytest.raises(ValueError, match="temperature=-1"):
        _continue(loaded, prompt, 4, temperature=-1.0)


def test_eval_walks_back_past_a_damaged_newest_checkpoint(trained_run, tmp_path, capsys):
    """As a resume does: the newest intact checkpoint, with a warning naming the damaged one;
    the damaged one asked for by name is a one-line error saying what is wrong."""
    from flaxlm.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # the shared run must stay as it is
    newest = run / "checkpoints" / str(TRAINED_RUN_STEPS)
    metadata = newest / "meta" / "metadata"
    metadata.write_text(metadata.read_text()[:-40] + " not json")

    with pytest.warns(UserWarning, match=f"{re.escape(str(newest))} is damaged"):
        assert main(["eval", str(run), "--json", "--max-batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 150

    assert main(["eval", str(newest), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flaxlm eval: error: checkpoint {newest} is damaged: meta/metadata")
    assert err.count("\n") == 1
    assert (newest / "MANIFEST.json").is_file()  # a reader deletes nothing
