"""``flaxlm finetune`` on a t5 run: seq2seq fine-tuning on (input, target) pairs.

    flaxlm finetune runs/t5_demo --data data/shakespeare_pairs.csv --input-column input \
        --target-column target --group-column play --epochs 3 --json

    report = finetune_seq2seq("runs/t5_demo", "pairs.csv", Seq2SeqOptions(epochs=3))
    report["exact_match"], report["baseline"], report["copy_baseline"]

The same conventions as the classifier fine-tune (flaxlm/tools/finetune.py): AdamW with linear
warmup over the first 10 % of the steps and linear decay to 0, clipping at 1
(:func:`flaxlm.tools.finetune.finetune_optim`); validation is ``val_data`` or the rows whose
group hashes below ``val_fraction``. Training pairs are packed into rows
(flaxlm/data/seq2seq_batches.py ``PairBatches``) and the batch of step k is a pure function of
(seed, k); the loss is the t5 family's own (target-token cross-entropy). After training, the
validation inputs are decoded greedily (flaxlm/tools/seq2seq_generate.py) and compared with
their targets: ``exact_match`` is the share equal after stripping outer whitespace. Two
baselines need no model: ``copy_baseline`` answers the input itself, ``majority_baseline`` the
most frequent training target; ``baseline`` is the better of the two.

The result is a run dir (``out``, default ``RUN_DIR/finetune``) that ``flaxlm generate`` and
``flaxlm eval`` read like any run, with ``seq2seq.json`` (options and report) beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from flaxlm.config import ConfigError
from flaxlm.data.seq2seq_batches import PairBatches, encode_pair
from flaxlm.data.seq2seq_pairs import PairRow, read_pairs, split_pairs
from flaxlm.families import build_model, family_of
from flaxlm.tools.finetune import finetune_optim
from flaxlm.tools.load import LoadedModel, load_checkpoint, resolve_checkpoint
from flaxlm.tools.seq2seq_generate import generate_seq2seq_ids, text_decoder
from flaxlm.train.optim import make_optimizer


@dataclass
class Seq2SeqOptions:
    input_column: str = "input"
    target_column: str = "target"
    group_column: str = ""  # rows sharing a value stay in one split; "" = each row alone
    val_data: str = ""  # a separate pairs file for validation; "" = split the data
    val_fraction: float = 0.1
    epochs: int = 3
    lr: float = 5e-4
    batch_size: int = 32  # packed rows per step
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    dropout: float = 0.1
    max_len: int = 0  # encoder tokens per pair incl. </s>; 0 = the run's data.seq_len
    target_len: int = 0  # decoder tokens per packed row; 0 = max_len (the encoder's)
    max_train_rows: int = 0  # 0 = all (a subset for quick runs)
    max_val_rows: int = 0  # 0 = all (exact match decodes every one)
    seed: int = 0
    out: str = ""  # where to save; "" = RUN_DIR/finetune


def finetune_seq2seq(
    checkpoint: str | Path | LoadedModel,
    data: str | Path,
    options: Seq2SeqOptions | None = None,
    log=None,
) -> dict[str, Any]:
    """Fine-tunes and evaluates; returns the report (``exact_match``, ``baseline``,
    ``copy_baseline``, ``majority_baseline``, ``n_train``, ``n_val``, per-epoch ``history``,
    ``checkpoint``). ``log`` (default: print to stderr) receives one line per epoch."""
    opts = options or Seq2SeqOptions()
    log = log or (lambda line: print(line, file=sys.stderr))
    if opts.epochs < 1 or opts.batch_size < 1 or opts.lr <= 0:
        raise ValueError(
            f"epochs={opts.epochs}, batch_size={opts.batch_size}, lr={opts.lr} must be > 0"
        )
    loaded, out = _load_seq2seq(checkpoint, opts)
    train_rows, val_rows = _read_rows(data, opts)
    cfg = _finetune_config(loaded, opts)
    train = _encode(train_rows, loaded, cfg)  # bad rows fail here, before any output
    report = baselines(train_rows, val_rows)
    log(
        f"{len(train_rows)} train / {len(val_rows)} val pairs; copying the input scores "
        f"{100 * report['copy_baseline']:.1f}%, the most frequent target "
        f"{100 * report['majority_baseline']:.1f}% exact match on val"
    )
    batches = PairBatches(
        train, cfg.data.seq_len, cfg.seq2seq.target_len, opts.batch_size, opts.seed,
        start_id=loaded.tokenizer.pad_id,
    )  # fmt: skip
    start = time.perf_counter()
    params, history = _train(loaded, cfg, batches, opts, log)
    model = build_model(dataclasses.replace(cfg.model, dropout=0.0))
    inputs = [r.input for r in val_rows]
    # Decoding stops at </s> or after the longest target seen (+ </s>).
    longest = max(len(x) for x in loaded.tokenizer.encode_batch([r.target for r in val_rows]))
    report["max_new_tokens"] = longest + 1
    predictions = predict(loaded, model, params, inputs, cfg.data.seq_len, longest + 1)
    report["exact_match"] = exact_match(predictions, [r.target for r in val_rows])
    report["gain_over_baseline"] = report["exact_match"] - report["baseline"]
    report["examples"] = [
        {"input": r.input, "target": r.target, "prediction": p}
        for r, p in zip(val_rows[:5], predictions[:5], strict=False)
    ]
    report["history"] = history
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["checkpoint"] = str(_save(out, cfg, params, loaded, opts, report))
    return report


def _load_seq2seq(
    checkpoint: str | Path | LoadedModel, opts: Seq2SeqOptions
) -> tuple[LoadedModel, Path]:
    if isinstance(checkpoint, LoadedModel):
        loaded, out = checkpoint, Path(opts.out or Path(checkpoint.cfg.train.run_dir) / "finetune")
    else:
        loaded = load_checkpoint(checkpoint)
        out = Path(opts.out) if opts.out else resolve_checkpoint(checkpoint)[0] / "finetune"
    if not family_of(loaded.cfg).encoder_decoder:
        raise ConfigError(
            f"seq2seq fine-tuning needs an encoder-decoder (model.family=t5), got "
            f"model.family={loaded.cfg.model.family!r}"
        )
    return loaded, out


def _read_rows(data: str | Path, opts: Seq2SeqOptions) -> tuple[list[PairRow], list[PairRow]]:
    cols = (opts.input_column, opts.target_column, opts.group_column)
    rows = read_pairs(data, *cols)
    if opts.val_data:
        train_rows, val_rows = rows, read_pairs(opts.val_data, *cols)
    else:
        train_rows, val_rows = split_pairs(rows, opts.val_fraction)
    if opts.max_train_rows:
        pick = np.random.default_rng(opts.seed).permutation(len(train_rows))
        train_rows = [train_rows[i] for i in np.sort(pick[: opts.max_train_rows])]
    if opts.max_val_rows:
        pick = np.random.default_rng(opts.seed + 1).permutation(len(val_rows))
        val_rows = [val_rows[i] for i in np.sort(pick[: opts.max_val_rows])]
    return train_rows, val_rows


def baselines(train_rows: list[PairRow], val_rows: list[PairRow]) -> dict[str, Any]:
    """What needs no model: copy the input; answer the most frequent training target."""
    gold = [r.target for r in val_rows]
    majority, _ = Counter(r.target for r in train_rows).most_common(1)[0]
    copy = exact_match([r.input for r in val_rows], gold)
    most = exact_match([majority] * len(gold), gold)
    return {
        "n_train": len(train_rows),
        "n_val": len(val_rows),
        "copy_baseline": copy,
        "majority_target": majority,
        "majority_baseline": most,
        "baseline": max(copy, most),
    }


def exact_match(predictions: list[str], targets: list[str]) -> float:
    """Share of predictions equal to their target (outer whitespace stripped)."""
    hits = [p.strip() == t.strip() for p, t in zip(predictions, targets, strict=True)]
    return float(np.mean(hits)) if hits else 0.0


def _finetune_config(loaded: LoadedModel, opts: Seq2SeqOptions):
    """The run's config for pairs: ``data.seq_len`` = the encoder length, ``seq2seq`` task
    ``pairs`` with its decoder rows ``opts.target_len`` long (0 = the encoder's length)."""
    cfg = copy.deepcopy(loaded.cfg)
    cfg.data = dataclasses.replace(cfg.data, seq_len=opts.max_len or cfg.data.seq_len)
    cfg.seq2seq = dataclasses.replace(
        cfg.seq2seq, task="pairs", target_len=opts.target_len or cfg.data.seq_len,
        input_column=opts.input_column, target_column=opts.target_column,
    )  # fmt: skip
    cfg.model = dataclasses.replace(cfg.model, dropout=opts.dropout)
    return cfg


def _encode(rows: list[PairRow], loaded: LoadedModel, cfg) -> list:
    tok = loaded.tokenizer
    inputs = tok.encode_batch([r.input for r in rows])
    targets = tok.encode_batch([r.target for r in rows])
    return [
        encode_pair(i, t, cfg.data.seq_len, cfg.seq2seq.target_len, tok.eos_id, r.where)
        for r, i, t in zip(rows, inputs, targets, strict=True)
    ]


def _train(loaded: LoadedModel, cfg, batches: PairBatches, opts: Seq2SeqOptions, log):
    """``opts.epochs`` passes over the packed rows; returns (params, one record per epoch)."""
    family = family_of(cfg)
    model = build_model(cfg.model)
    steps_per_epoch = -(-batches.n_examples // opts.batch_size)
    total = steps_per_epoch * opts.epochs
    tx, _ = make_optimizer(finetune_optim(opts, total), total, cfg.model.d_model)
    params = jax.device_get(loaded.params)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, rng):
        def objective(p):
            scales = family.loss_scales(cfg, batch)
            return family.loss(p, batch, model, cfg, scales, rng, False)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    history, start = [], time.perf_counter()
    base_rng = jax.random.key(opts.seed + 1)
    for epoch in range(1, opts.epochs + 1):
        losses = []
        for k in range((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch):
            rng = jax.random.fold_in(base_rng, k)
            params, opt_state, loss = step(params, opt_state, batches.batch(k), rng)
            losses.append(loss)
        record = {"epoch": epoch, "train_loss": float(np.mean(jax.device_get(losses)))}
        history.append(record)
        log(
            f"epoch {epoch}/{opts.epochs}: train loss {record['train_loss']:.4f} "
            f"({time.perf_counter() - start:.0f}s)"
        )
    return params, history


def predict(
    loaded: LoadedModel, model, params, inputs: list[str], context: int, max_new_tokens: int,
    batch: int = 64,
) -> list[str]:  # fmt: skip
    """Greedy completions (at most ``max_new_tokens``) of ``inputs``, the encoder inputs."""
    from flaxlm.tools.generate import GenerateOptions

    tok = loaded.tokenizer
    ids = tok.encode_batch(inputs)
    opts = GenerateOptions(max_new_tokens=max_new_tokens)
    decode = text_decoder(loaded)
    out = []
    for i in range(0, len(ids), batch):
        rows, _ = generate_seq2seq_ids(
            model, params, ids[i : i + batch], opts, tok.eos_id, tok.pad_id, context
        )
        out += [decode(r) for r in rows]
    return out


def _save(out: Path, cfg, params, loaded: LoadedModel, opts: Seq2SeqOptions, report) -> Path:
    """The fine-tuned model as a run dir (checkpoint 0) plus ``seq2seq.json``."""
    from flaxlm.tools.load import save_params_checkpoint

    out = Path(out).absolute()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(out)))
    cfg.model = dataclasses.replace(cfg.model, dropout=0.0)
    save_params_checkpoint(out, cfg, params, loaded.tokenizer, step=0)
    meta = {
        "options": asdict(opts),
        "base_step": loaded.step,
        "report": {k: v for k, v in report.items() if k != "checkpoint"},
    }
    (out / "seq2seq.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
