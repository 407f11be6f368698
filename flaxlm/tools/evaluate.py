"""``flaxlm eval``: loss, perplexity and next-token accuracy of a checkpoint on a split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from flaxlm.data import CausalBatches, prepare_data, tokenize_documents, unigram_cross_entropy
from flaxlm.tools.load import LoadedModel, load_checkpoint
from flaxlm.train.batches import evaluate_batches, rows_per_shard
from flaxlm.train.step import jit_eval_step, make_eval_step


def evaluate(
    path: str | Path | LoadedModel,
    data_paths: list[str] | None = None,
    split: str = "val",
    max_batches: int = 0,
    batch_size: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluates a run dir / checkpoint. Returns ``val_loss``, ``perplexity``, ``accuracy``,
    ``tokens``, ``step``; on the run's own data also ``unigram_loss`` (the cross-entropy of the
    same tokens under the train split's unigram distribution), the baseline to beat.

    ``data_paths`` evaluates on other text/JSONL sources instead (all of their documents,
    through the run's tokenizer). ``max_batches=0`` means the whole split.
    """
    loaded = path if isinstance(path, LoadedModel) else load_checkpoint(path)
    cfg = loaded.cfg
    seq_len = cfg.data.seq_len
    report: dict[str, Any] = {"step": loaded.step}
    if data_paths:
        tokens = tokenize_documents(data_paths, cfg.data.jsonl_field, loaded.tokenizer)
        report["data"] = list(map(str, data_paths))
    else:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not one of train, val")
        # The run's own data, through the tokenizer stored with the checkpoint.
        data = prepare_data(cfg.data, cfg.model.vocab_size, progress, loaded.tokenizer)
        tokens = data.val if split == "val" else data.train
        report["split"] = split
        report["unigram_loss"] = unigram_cross_entropy(
            data.train, tokens, loaded.tokenizer.vocab_size
        )
    shards = rows_per_shard(loaded.mesh)
    batch_size = batch_size or cfg.train.batch_size // cfg.train.grad_accum
    batch_size = -(-batch_size // shards) * shards  # round up to a multiple of the shards
    batches = CausalBatches(tokens, seq_len, batch_size, seed=0, shuffle=False)
    eval_step = jit_eval_step(
        make_eval_step(loaded.model, cfg), loaded.mesh, loaded.params_sharding
    )
    local = batches.eval_batches(batch_size, max_batches, jax.process_index(), jax.process_count())
    report.update(evaluate_batches(eval_step, loaded.params, local, loaded.mesh))

    if "unigram_loss" in report:
        report["gain_over_unigram"] = report["unigram_loss"] - report["val_loss"]
    return report
