"""``flaxlm eval`` of a ``model.family: bert`` checkpoint: MLM loss / accuracy, NSP accuracy.

Called by :func:`flaxlm.tools.evaluate.evaluate`. Masks and pairs of the evaluated split are
drawn from the run's seed and each example's index, so two evaluations of any checkpoints see
the same masked positions. On the run's own data the report adds the frequency baseline: the
accuracy of always guessing the train split's most frequent token, and the loss of its unigram
distribution, at the same masked positions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from flaxlm.data.masked import layout_of, make_masked_batches
from flaxlm.tools.evaluate import add_timing, batch_count, sharded_batch_size, split_tokens
from flaxlm.tools.load import LoadedModel
from flaxlm.train.masked_step import evaluate_masked_batches
from flaxlm.train.step import jit_eval_step, make_eval_step


def evaluate_masked(
    loaded: LoadedModel,
    data_paths: list[str] | None = None,
    split: str = "val",
    max_batches: int = 0,
    batch_size: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """See :func:`flaxlm.tools.evaluate.evaluate`; returns ``val_loss``, ``mlm_loss``,
    ``mlm_accuracy``, ``nsp_loss``/``nsp_accuracy`` (NSP runs), per-objective losses (unified
    runs), ``tokens`` (predicted positions) and, on the run's data, ``mlm_frequency_accuracy``
    and ``mlm_unigram_loss``."""
    cfg = loaded.cfg
    report: dict[str, Any] = {"step": loaded.step}
    tokens, train = split_tokens(loaded, data_paths, split, progress, report)
    batch_size = sharded_batch_size(loaded, batch_size)
    batches = make_masked_batches(tokens, cfg, loaded.tokenizer, batch_size, shuffle=False)
    eval_step = jit_eval_step(
        make_eval_step(loaded.model, cfg), loaded.mesh, loaded.params_sharding, batches.keys
    )
    targets: list[np.ndarray] = []
    local = _recording(
        batches.eval_batches(batch_size, max_batches, jax.process_index(), jax.process_count()),
        targets,
        layout_of(cfg) != "unified",
    )
    n_batches = batch_count(batches.n_examples, batch_size, max_batches)
    start = time.perf_counter()
    with tqdm(total=n_batches, desc="eval", unit="batch", disable=not progress) as bar:
        report.update(
            evaluate_masked_batches(
                eval_step, loaded.params, _ticking(local, bar), loaded.mesh, cfg
            )
        )
    add_timing(report, n_batches, cfg.data.seq_len, start)
    if train is not None and targets:
        counts = np.bincount(np.asarray(train.tokens), minlength=loaded.tokenizer.vocab_size)
        report.update(
            frequency_baseline(counts.astype(np.float64), np.concatenate(targets), loaded.tokenizer)
        )
    return report


def frequency_baseline(train_counts: np.ndarray, targets: np.ndarray, tokenizer) -> dict:
    """Accuracy of always predicting the most frequent non-special train token, and the loss
    of the add-one-smoothed train unigram distribution over non-special tokens, on ``targets``
    (the masked tokens; specials are never masked)."""
    counts = train_counts.copy()
    specials = [tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
                tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id]  # fmt: skip
    counts[[i for i in specials if i is not None]] = 0
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + len(counts))
    return {
        "mlm_frequency_accuracy": float(np.mean(targets == int(np.argmax(counts)))),
        "mlm_unigram_loss": float(-log_p[targets].mean()),
    }


def _recording(batches: Iterator[dict], out: list[np.ndarray], gathered: bool) -> Iterator[dict]:
    """Passes batches through, keeping the masked tokens of this process's real predictions."""
    for batch in batches:
        if gathered:
            out.append(batch["masked_ids"][batch["masked_weights"] > 0])
        yield batch


def _ticking(batches: Iterator[dict], bar: tqdm) -> Iterator[dict]:
    for batch in batches:
        yield batch
        bar.update(1)
