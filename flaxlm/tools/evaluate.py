"""``flaxlm eval``: a checkpoint's loss and its family's metrics (GPT: perplexity, next-token
accuracy; BERT: MLM / NSP accuracy; unified: each objective's loss) on a split.

report = evaluate("runs/gpt_demo", progress=True)
path = save_report(report, "runs/gpt_demo")   # runs/gpt_demo/evals/step_300.val.json
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from flaxlm import storage
from flaxlm.data import prepare_data, tokenize_documents
from flaxlm.families import Baseline, family_of
from flaxlm.tools.load import LoadedModel, load_checkpoint, resolve_checkpoint
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
    """Evaluates a run dir / checkpoint with its family's metrics. Returns ``step``,
    ``val_loss``, the family's fields (GPT: ``perplexity``, ``accuracy``; BERT: ``mlm_loss``,
    ``mlm_accuracy``, ``nsp_accuracy``, ...; unified: each objective's loss) and ``tokens``
    (predicted positions); on the run's own data also the family's baseline to beat (GPT:
    ``unigram_loss`` and ``gain_over_unigram``, the cross-entropy of the same tokens under the
    train split's unigram distribution; BERT: ``mlm_frequency_accuracy`` and
    ``mlm_unigram_loss`` at the same masked positions).

    ``data_paths`` evaluates on other text/JSONL sources instead (all of their documents,
    through the run's tokenizer). ``max_batches=0`` means the whole split. ``progress`` shows
    a bar over the batches. Also reports ``batches``, ``seq_len``, ``seconds`` and
    ``tokens_per_s``. Masks and pairs of a BERT split are drawn from the run's seed and each
    example's index, so two evaluations of any checkpoints see the same masked positions.
    """
    loaded = path if isinstance(path, LoadedModel) else load_checkpoint(path)
    cfg, family = loaded.cfg, family_of(loaded.cfg)
    report: dict[str, Any] = {"step": loaded.step}
    tokens, train = split_tokens(loaded, data_paths, split, progress, report)
    baseline = None if train is None else family.baseline(cfg, loaded.tokenizer, train, tokens)
    batch_size = sharded_batch_size(loaded, batch_size)
    batches = family.eval_batches(tokens, cfg, loaded.tokenizer, batch_size)
    eval_step = jit_eval_step(
        make_eval_step(loaded.model, family, cfg),
        loaded.mesh,
        loaded.params_sharding,
        family.batch_keys(cfg, False),
    )
    local = batches.eval_batches(batch_size, max_batches, jax.process_index(), jax.process_count())
    n_batches = batch_count(batches.n_examples, batch_size, max_batches)
    start = time.perf_counter()
    with tqdm(total=n_batches, desc="eval", unit="batch", disable=not progress) as bar:
        seen = _observed(local, baseline, bar)
        report.update(evaluate_batches(eval_step, loaded.params, seen, loaded.mesh, family, cfg))
    add_timing(report, n_batches, cfg.data.seq_len, start)
    if baseline is not None:
        report.update(baseline.report(report))
    return report


def _observed(batches: Iterator[dict], baseline: Baseline | None, bar: tqdm) -> Iterator[dict]:
    """Passes batches through, showing each to the baseline and advancing the bar."""
    for batch in batches:
        if baseline is not None:
            baseline.observe(batch)
        yield batch
        bar.update(1)


def split_tokens(
    loaded: LoadedModel,
    data_paths: list[str] | None,
    split: str,
    progress: bool,
    report: dict[str, Any],
) -> tuple[Any, Any]:
    """The tokens to evaluate and the run's train split (None for other sources):
    ``data_paths``' documents through the run's tokenizer, else the run's own ``split``
    (through the tokenizer stored with the checkpoint). Records which in ``report``."""
    cfg = loaded.cfg
    if data_paths:
        report["data"] = list(map(str, data_paths))
        return tokenize_documents(data_paths, cfg.data.jsonl_field, loaded.tokenizer), None
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is not one of train, val")
    data = prepare_data(cfg.data, cfg.model.vocab_size, progress, loaded.tokenizer)
    report["split"] = split
    return (data.val if split == "val" else data.train), data.train


def sharded_batch_size(loaded: LoadedModel, batch_size: int) -> int:
    """``batch_size`` (0: the run's per-step batch), rounded up to a multiple of the shards."""
    cfg = loaded.cfg
    shards = rows_per_shard(loaded.mesh)
    batch_size = batch_size or cfg.train.batch_size // cfg.train.grad_accum
    return -(-batch_size // shards) * shards


def batch_count(n_examples: int, batch_size: int, max_batches: int) -> int:
    """Batches in an evaluation of ``n_examples`` (the last one padded), at most ``max_batches``
    when that is > 0."""
    n_batches = -(-n_examples // batch_size)
    return min(n_batches, max_batches) if max_batches else n_batches


def add_timing(report: dict[str, Any], n_batches: int, seq_len: int, start: float) -> None:
    """Adds ``batches``, ``seq_len``, ``seconds`` (since ``start``) and ``tokens_per_s``."""
    seconds = time.perf_counter() - start
    report.update(batches=n_batches, seq_len=seq_len, seconds=round(seconds, 3))
    report["tokens_per_s"] = report["tokens"] / max(seconds, 1e-9)


def report_path(report: dict[str, Any], checkpoint: str | Path) -> Path | str:
    """Where ``flaxlm eval`` writes its JSON by default: ``RUN_DIR/evals/step_<N>.<what>.json``
    with ``<what>`` the split, or ``data-<hash>`` of the sources evaluated."""
    run_dir, _ = resolve_checkpoint(checkpoint)
    if "data" in report:
        digest = hashlib.sha256("\n".join(report["data"]).encode()).hexdigest()[:8]
        what = f"data-{digest}"
    else:
        what = report["split"]
    return storage.native(storage.join(str(run_dir), "evals", f"step_{report['step']}.{what}.json"))


def save_report(report: dict[str, Any], checkpoint: str | Path, out: str | Path | None = None):
    """Writes ``report`` as JSON to ``out`` (default :func:`report_path`); returns the path."""
    path = storage.native(out) if out else report_path(report, checkpoint)
    storage.make_dirs(storage.parent_of(str(path)))
    storage.write_text(str(path), json.dumps(report, indent=2) + "\n")  # whole or not at all
    return path
