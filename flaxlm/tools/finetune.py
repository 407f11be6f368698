"""``flaxlm finetune``: a classifier on the pooled [CLS] vector of a pretrained BERT run.

    flaxlm finetune runs/bert_demo --data data/rotten_tomatoes.csv --text-column text \
        --label-column label --group-column movie --epochs 3 --json

    result = finetune("runs/bert_demo", "reviews.csv", FinetuneOptions(epochs=3))
    result["accuracy"], result["macro_f1"], result["majority_baseline"]

As for BERT fine-tuning (Devlin et al.): dropout 0.1 on the pooled vector, a linear head,
AdamW (beta2 0.999, eps 1e-6, weight decay 0.01 on matrices only, not on biases and norms),
linear warmup over the first 10 % of the steps then linear decay to 0, gradient clipping at 1
(:func:`finetune_optim`, run by pretraining's own :func:`flaxlm.train.optim.make_optimizer`).
``freeze_body`` trains only the head: the encoder's parameters are not even handed to the
optimizer, so they stay bit-identical. Validation is ``val_data``, or the rows whose group
(``group_column``, e.g. the movie) hashes below ``val_fraction``. The fine-tuned parameters
are saved with the labels, tokenizer and options; :func:`load_classifier` reads them back.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import linen as nn

from flaxlm import storage
from flaxlm.config import ConfigError, ModelConfig, OptimConfig, from_dict
from flaxlm.data.labelled import LabelledRow, read_labelled, split_rows
from flaxlm.data.sources import DataError
from flaxlm.families import family_of
from flaxlm.models import BERT, layers
from flaxlm.tokenizers.sentencepiece import Tokenizer
from flaxlm.tools.load import LoadedModel, load_checkpoint, resolve_checkpoint
from flaxlm.train.optim import make_optimizer


@dataclass
class FinetuneOptions:
    text_column: str = "text"
    label_column: str = "label"
    group_column: str = ""  # rows sharing a value stay in one split; "" = each row alone
    val_data: str = ""  # a separate labelled file for validation; "" = split the data
    val_fraction: float = 0.2
    labels: tuple[str, ...] = ()  # the classes, in order; () = the training labels, sorted
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    dropout: float = 0.1
    freeze_body: bool = False
    max_len: int = 0  # tokens per example incl. [CLS]/[SEP]; 0 = the run's data.seq_len
    max_train_rows: int = 0  # 0 = all (a subset for quick runs)
    seed: int = 0
    out: str = ""  # where to save; "" = RUN_DIR/finetune


class BertClassifier(nn.Module):
    """BERT body (``bert``: the pretrained tree) + dropout + linear ``classifier`` on the
    pooled [CLS] vector."""

    cfg: ModelConfig
    n_classes: int
    dropout: float = 0.1

    def setup(self) -> None:
        self.bert = BERT(self.cfg)
        self.classifier = layers.Dense(
            self.cfg, (self.n_classes,), ("embed", "classes"), ("classes",)
        )
        self.drop = nn.Dropout(self.dropout)

    def __call__(self, tokens_BxL, segment_ids_BxL, deterministic: bool = True):
        pooled_BxD = self.bert.pooled(tokens_BxL, segment_ids_BxL, None, deterministic)
        pooled_BxD = self.drop(pooled_BxD, deterministic=deterministic)
        return self.classifier(pooled_BxD)  # logits_BxC, float32


def encode_rows(
    rows: list[LabelledRow], tokenizer: Tokenizer, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """``[CLS] text [SEP]`` (truncated to ``max_len``), padded: (N, L) tokens, segment ids
    (1 real, 0 padding); L = the longest row, at most ``max_len``."""
    ids = tokenizer.encode_batch([r.text for r in rows])
    length = min(max_len, max(len(x) for x in ids) + 2)
    tokens = np.full((len(rows), length), tokenizer.pad_id, dtype=np.int32)
    segments = np.zeros((len(rows), length), dtype=np.int32)
    for i, x in enumerate(ids):
        row = [tokenizer.cls_id, *x[: length - 2], tokenizer.sep_id]
        tokens[i, : len(row)] = row
        segments[i, : len(row)] = 1
    return tokens, segments


def macro_f1(pred: np.ndarray, gold: np.ndarray, n_classes: int) -> float:
    """Mean over classes of F1 (a class never predicted nor present scores 0)."""
    scores = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (gold == c))
        fp, fn = np.sum((pred == c) & (gold != c)), np.sum((pred != c) & (gold == c))
        scores.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(scores))


def finetune_optim(opts: FinetuneOptions, total_steps: int) -> OptimConfig:
    """BERT's fine-tuning recipe for :func:`flaxlm.train.optim.make_optimizer`: AdamW (beta2 0.999,
    eps 1e-6), linear warmup over ``warmup_ratio`` of the steps (at least one), linear decay
    to 0 at ``total_steps``, clipping at global norm 1."""
    return OptimConfig(
        lr=opts.lr,
        schedule="linear",
        warmup_steps=max(1, int(opts.warmup_ratio * total_steps)),
        decay_steps=total_steps,
        min_lr_ratio=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-6,
        weight_decay=opts.weight_decay,
        clip_norm=1.0,
    )


@dataclass
class _Split:
    """One split, encoded: ``tokens`` and ``segments`` (N, L), class indices ``labels`` (N,)."""

    tokens: np.ndarray
    segments: np.ndarray
    labels: np.ndarray


def finetune(
    checkpoint: str | Path | LoadedModel,
    data: str | Path,
    options: FinetuneOptions | None = None,
    log=None,
) -> dict[str, Any]:
    """Fine-tunes and evaluates; returns the final report (``accuracy``, ``macro_f1``,
    ``majority_baseline``, ``class_counts``, per-epoch ``history``, ``checkpoint``).
    ``log`` (default: print to stderr) receives one line per epoch."""
    opts = options or FinetuneOptions()
    log = log or (lambda line: print(line, file=sys.stderr))
    loaded, out = _load_encoder(checkpoint, opts)
    if opts.epochs < 1 or opts.batch_size < 1 or opts.lr <= 0:
        raise ValueError(
            f"epochs={opts.epochs}, batch_size={opts.batch_size}, lr={opts.lr} must be > 0"
        )
    cfg = loaded.cfg
    train_rows, val_rows, labels = _read_rows(data, opts)
    max_len = min(opts.max_len or cfg.data.seq_len, cfg.model.max_seq_len)
    train = _encode_split(train_rows, labels, loaded.tokenizer, max_len)
    val = _encode_split(val_rows, labels, loaded.tokenizer, max_len)
    report = _baseline_report(labels, train, val, log)

    model = BertClassifier(cfg.model, len(labels), opts.dropout)
    head = model.init(jax.random.key(opts.seed), train.tokens[:1], train.segments[:1])["params"]
    params = {
        "bert": jax.device_get(loaded.params),
        "classifier": nn.meta.unbox(head["classifier"]),
    }
    # Frozen body: only the head is trainable; the body is a constant input of the step.
    if opts.freeze_body:
        trainable, frozen = {"classifier": params["classifier"]}, {"bert": params["bert"]}
    else:
        trainable, frozen = params, {}
    start = time.perf_counter()
    final, history = _train(model, trainable, frozen, train, val, opts, log)
    report.update(accuracy=history[-1]["accuracy"], macro_f1=history[-1]["macro_f1"])
    report["gain_over_majority"] = report["accuracy"] - report["majority_baseline"]
    report["history"] = history
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["checkpoint"] = str(save_classifier(out, final, loaded, labels, opts, report))
    return report


def _load_encoder(
    checkpoint: str | Path | LoadedModel, opts: FinetuneOptions
) -> tuple[LoadedModel, Path | str]:
    """The pretrained run and the folder the classifier goes to; refuses a family without a
    [CLS] pooler to classify from."""
    # out: a folder or a bucket URL (flaxlm.storage)
    if isinstance(checkpoint, LoadedModel):
        loaded = checkpoint
        out = opts.out or storage.join(str(checkpoint.cfg.train.run_dir), "finetune")
    else:
        loaded = load_checkpoint(checkpoint)
        out = opts.out or storage.join(str(resolve_checkpoint(checkpoint)[0]), "finetune")
    if not family_of(loaded.cfg).classifies:
        raise ConfigError(
            f"finetune needs an encoder with a [CLS] pooler (model.family=bert), got "
            f"model.family={loaded.cfg.model.family!r}"
        )
    return loaded, out


def _read_rows(
    data: str | Path, opts: FinetuneOptions
) -> tuple[list[LabelledRow], list[LabelledRow], list[str]]:
    """(train rows, validation rows, the classes in order); every row's label must be one of
    the classes, and there must be at least two."""
    rows = read_labelled(data, opts.text_column, opts.label_column, opts.group_column)
    if opts.val_data:
        train_rows = rows
        val_rows = read_labelled(
            opts.val_data, opts.text_column, opts.label_column, opts.group_column
        )
    else:
        train_rows, val_rows = split_rows(rows, opts.val_fraction)
    if opts.max_train_rows:
        pick = np.random.default_rng(opts.seed).permutation(len(train_rows))
        train_rows = [train_rows[i] for i in np.sort(pick[: opts.max_train_rows])]
    labels = list(opts.labels) or sorted({r.label for r in train_rows})
    if len(labels) < 2:
        raise DataError(f"{data}: found only the label(s) {labels}; a classifier needs >= 2")
    known = set(labels)
    for r in train_rows + val_rows:
        if r.label not in known:
            raise DataError(f"{r.where}: label {r.label!r} is not one of {', '.join(labels)}")
    return train_rows, val_rows, labels


def _encode_split(
    rows: list[LabelledRow], labels: list[str], tokenizer: Tokenizer, max_len: int
) -> _Split:
    index = {name: i for i, name in enumerate(labels)}
    tokens, segments = encode_rows(rows, tokenizer, max_len)
    return _Split(tokens, segments, np.array([index[r.label] for r in rows], dtype=np.int32))


def _baseline_report(labels: list[str], train: _Split, val: _Split, log) -> dict[str, Any]:
    """The report's first fields: split sizes, class counts and what always answering the
    most frequent training class scores on validation (the bar a classifier must clear)."""
    counts = np.bincount(train.labels, minlength=len(labels))
    majority = int(np.argmax(counts))
    report: dict[str, Any] = {
        "labels": labels,
        "n_train": len(train.labels),
        "n_val": len(val.labels),
        "class_counts": {name: int(c) for name, c in zip(labels, counts, strict=True)},
        "majority_label": labels[majority],
        "majority_baseline": float(np.mean(val.labels == majority)),
    }
    log(
        f"{report['n_train']} train / {report['n_val']} val rows; class counts "
        f"{report['class_counts']}; majority '{labels[majority]}' scores "
        f"{100 * report['majority_baseline']:.1f}% on val"
    )
    return report


def _train(
    model: BertClassifier, trainable, frozen, train: _Split, val: _Split, opts: FinetuneOptions,
    log,
) -> tuple[Any, list[dict[str, Any]]]:  # fmt: skip
    """``opts.epochs`` epochs over ``train`` in a seeded order per epoch, each followed by a
    validation pass; returns (the final parameters, one record per epoch)."""
    steps_per_epoch = -(-len(train.labels) // opts.batch_size)
    total = steps_per_epoch * opts.epochs
    tx, _ = make_optimizer(finetune_optim(opts, total), total, model.cfg.d_model)
    opt_state = tx.init(trainable)
    train_step, predict = _compiled_steps(model, tx)
    history = []
    base_rng = jax.random.key(opts.seed + 1)
    start = time.perf_counter()
    for epoch in range(1, opts.epochs + 1):
        order = np.random.default_rng([opts.seed, epoch]).permutation(len(train.labels))
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * opts.batch_size : (b + 1) * opts.batch_size]
            rng = jax.random.fold_in(base_rng, (epoch - 1) * steps_per_epoch + b)
            trainable, opt_state, loss = train_step(
                trainable, opt_state, frozen, train.tokens[idx], train.segments[idx],
                train.labels[idx], rng,
            )  # fmt: skip
            losses.append(loss)
        acc, f1 = _evaluate(predict, {**frozen, **trainable}, val, model.n_classes)
        record = {"epoch": epoch, "train_loss": float(np.mean(jax.device_get(losses))),
                  "accuracy": acc, "macro_f1": f1}  # fmt: skip
        history.append(record)
        log(
            f"epoch {epoch}/{opts.epochs}: train loss {record['train_loss']:.4f}, val accuracy "
            f"{100 * acc:.1f}%, macro-F1 {100 * f1:.1f}% ({time.perf_counter() - start:.0f}s)"
        )
    return {**frozen, **trainable}, history


def _compiled_steps(model: BertClassifier, tx: optax.GradientTransformation):
    """(train_step, predict), jitted. The frozen body enters the step as an input apart from
    the trainable tree, so the optimizer never sees it."""

    def loss_fn(trainable, frozen, tokens, segments, labels_B, rng):
        logits = model.apply(
            {"params": {**frozen, **trainable}}, tokens, segments, deterministic=False,
            rngs={"dropout": rng},
        )  # fmt: skip
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels_B).mean()

    @jax.jit
    def train_step(trainable, opt_state, frozen, tokens, segments, labels_B, rng):
        loss, grads = jax.value_and_grad(loss_fn)(
            trainable, frozen, tokens, segments, labels_B, rng
        )
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    @jax.jit
    def predict(all_params, tokens, segments):
        return jnp.argmax(model.apply({"params": all_params}, tokens, segments), axis=-1)

    return train_step, predict


def _evaluate(predict, all_params, val: _Split, n_classes: int) -> tuple[float, float]:
    """(accuracy, macro-F1) on ``val``, predicted 256 rows at a time."""
    preds = [
        np.asarray(predict(all_params, val.tokens[i : i + 256], val.segments[i : i + 256]))
        for i in range(0, len(val.tokens), 256)
    ]
    pred = np.concatenate(preds)
    return float(np.mean(pred == val.labels)), macro_f1(pred, val.labels, n_classes)


def save_classifier(out, params, loaded: LoadedModel, labels, opts, report) -> Path | str:
    """Writes ``out/params`` (Orbax), ``out/classifier.json`` (labels, options, the run's
    config, the report) and ``out/tokenizer.model``. Returns ``out``. A bucket ``out`` is
    written locally first and published with ``classifier.json`` last."""
    if not storage.is_posix(str(out)):
        local = save_classifier(storage.local_cache(str(out)), params, loaded, labels, opts, report)
        storage.publish(local, str(out), "classifier.json")
        return str(out)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", params, force=True)
    from flaxlm.config import to_dict

    meta = {
        "labels": labels,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items()},
        "config": to_dict(loaded.cfg),
        "base_step": loaded.step,
        "report": {k: v for k, v in report.items() if k != "checkpoint"},
    }
    (out / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "tokenizer.model").write_bytes(loaded.tokenizer.model_bytes)
    return out


def load_classifier(path: str | Path) -> tuple[BertClassifier, Any, list[str], Tokenizer]:
    """(model, params, labels, tokenizer) of a :func:`finetune` output folder (or a bucket's,
    copied to this host first)."""
    path = storage.stage(str(path)).absolute()
    meta = json.loads((path / "classifier.json").read_text())
    cfg = from_dict(meta["config"], check_paths=False)
    model = BertClassifier(cfg.model, len(meta["labels"]), meta["options"]["dropout"])
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params")
    tokenizer = Tokenizer.from_bytes((path / "tokenizer.model").read_bytes())
    return model, params, meta["labels"], tokenizer
