"""The family table: one entry per model family, and the lookups every command uses.

A *family* is everything that differs between, say, a GPT and a BERT: how the model is built,
how its batches are made, its loss and metrics, what its eval report holds, the batch ``plan``
and ``bench`` compile on, its HF converter. The trainer, the checkpoint tools and the CLI ask
the table; nothing else branches on ``model.family``. Adding a family is adding one entry:

    from flaxlm.families import Family, register_family, get_family

    register_family(dataclasses.replace(get_family("gpt"), name="my_lm", build_model=MyLM))
    train(load_config("configs/gpt_tiny.yaml", ["model.family=my_lm"]))

The loss contract (what makes gradient accumulation exact): ``loss_scales(cfg, batch)`` sees
the *whole* step's batch (leading axes ``A, b``) and returns the normalisers (e.g. one over the
number of predicted tokens); ``loss(params, mb, model, cfg, scales, rng, deterministic)`` gets
one ``(b, ...)`` micro-batch and returns ``(objective, metrics)``: the objective already
multiplied by the scales, so micro-batch objectives add up to the step's loss, and the metrics
as *sums* (``zero_metrics`` gives their zeros), which ``summarize`` turns into reported values
(``loss``, ``accuracy``, ``n_tokens`` at least).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flaxlm.config import Config, ConfigError, ConfigSection, register_section


class Baseline:
    """What a model must beat on an evaluated split (e.g. the train split's unigram loss).
    ``observe`` sees each host batch evaluated; ``report`` adds fields to the eval report."""

    def observe(self, batch: dict[str, np.ndarray]) -> None:
        pass

    def report(self, result: dict[str, Any]) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class ReportField:
    """One line of a printed eval report: ``key`` in the report, its label, and whether it is
    a loss (``nats``), a share (``percent``) or a plain number (``number``)."""

    key: str
    label: str
    kind: str = "nats"

    def format(self, value: float) -> str:
        if self.kind == "percent":
            return f"{100 * value:.1f}%"
        if self.kind == "nats":
            return f"{value:.4f} nats/token"
        return f"{value:.2f}"


@dataclass(frozen=True)
class TaskScoring:
    """How a family scores lm-evaluation-harness requests (``flaxlm eval --tasks``,
    flaxlm/tasks). ``kind`` names the batch layout ``token_log_probs`` takes and so how the
    requests are laid out:

    - ``"causal"`` (a decoder): rows ``tokens``, ``targets`` (the next token), ``positions``,
      ``segment_ids`` (0 = padding), all ``(B, L)``; returns ``(log_probs_BxL, greedy_BxL)``,
      the log-probability of each target and whether it is the argmax. Generation runs the
      model's KV cache (``model.apply(..., decode=True)``).
    - ``"masked"`` (an encoder): pseudo-log-likelihood, one row per continuation token with
      that token masked: ``tokens``, ``positions``, ``segment_ids``, ``token_types`` ``(B, L)``,
      ``masked_positions`` and ``targets`` ``(B, 1)``; returns the same pair ``(B, 1)``.
    - ``"seq2seq"`` (an encoder-decoder): targets given inputs, rows laid out as the t5
      family's training batches (``encoder_ids``, ``encoder_segment_ids``,
      ``encoder_positions`` ``(B, S)``; ``decoder_input_ids``, ``decoder_target_ids``,
      ``decoder_segment_ids``, ``decoder_positions`` ``(B, T)``); returns the pair ``(B, T)``.
      Generation runs T5's cached decoder (flaxlm/tasks/seq2seq.py).

    ``requests``: the request types it can run (``loglikelihood``, ``loglikelihood_rolling``,
    ``generate_until``); a task needing another is refused in one line."""

    kind: str
    token_log_probs: Callable[..., Any]
    requests: tuple[str, ...] = ("loglikelihood",)


@dataclass(frozen=True)
class FlopCount:
    """A family's training FLOPs (forward + backward) per counted token: each of a row's
    ``data.seq_len`` positions, the tokens that tokens/s and MFU count. ``body``: the blocks
    and attention; ``head``: the LM head; ``formula`` / ``head_formula``: how, as
    ``flaxlm bench`` prints them."""

    body: float
    head: float
    formula: str
    head_formula: str


@dataclass(frozen=True)
class Family:
    """One model family (see the module doc for the loss contract). Fields:

    - ``build_model(model_cfg)``: the flax.linen module. ``model.init(rng, tokens_1xL)`` must
      work with token ids alone (that is how the sharded state is initialised).
    - ``batch_keys(cfg, training)``: the keys of a batch (they fix the step's shardings).
    - ``train_batches(prepared, cfg, ramp)``: step-indexed training batches,
      ``.batch(step, process_index, process_count)`` a pure function of (seed, step); ``ramp``
      is the run's one :class:`~flaxlm.data.batch_ramp.BatchRamp` (built once per run and
      shared with the optimizer and the reporter; ``ramp.full`` is the global batch).
    - ``eval_batches(split, cfg, tokenizer, batch_size)``: the split in order, with
      ``.eval_batches(batch_size, max_batches, process_index, process_count)`` and
      ``.n_examples``.
    - ``zero_metrics``, ``loss_scales``, ``loss``, ``summarize``: the objective.
    - ``log_fields(cfg, metrics)``: extra per-step fields for metrics.jsonl (host values).
    - ``eval_report(cfg, totals)``: summed eval metrics -> the report (``val_loss`` first).
    - ``baseline(cfg, tokenizer, train_split, eval_split)``: a :class:`Baseline` or None.
    - ``report_fields``: how ``flaxlm eval`` prints the report; ``headline``: the keys a
      one-line summary shows after ``val_loss``.
    - ``synthetic_batch(cfg, rng)``: one global batch of random tokens, for ``plan``/``bench``.
    - ``predicted_positions(cfg)``: positions per row the LM head runs on (FLOP counts).
    - ``inspect_sample(cfg, prepared, batch, rows)``: the first ``rows`` rows of a training
      ``batch`` (made by ``train_batches``), decoded for ``flaxlm data inspect``.
    - ``converters``: the HF converters (``flaxlm convert``), the first whose ``accepts(cfg)``
      exports a config; empty for none.
    - ``generates``: a decoder ``flaxlm generate`` can sample from; ``classifies``: has a
      ``[CLS]`` pooler that ``flaxlm finetune`` puts a classifier on; ``encoder_decoder``: the
      prompt is the encoder input (flaxlm/tools/seq2seq_generate.py decodes it, and
      ``flaxlm finetune`` trains it on (input, target) pairs, flaxlm/tools/seq2seq_finetune.py).
    - ``task_scoring``: how it scores benchmark tasks (:class:`TaskScoring`); None for a
      family that cannot.
    - ``flop_count(cfg)``: its training FLOPs per counted token (:class:`FlopCount`), which
      the trainer's MFU, ``bench`` and ``plan`` use; None: the decoder formula
      (flaxlm/train/flops.py ``flops_per_token``).
    - ``check_config(cfg)``: the family's own config checks (raise ConfigError).
    - ``config_sections``: the config sections the family owns (``ConfigSection``: a path such
      as ``objective`` or ``model.<name>``, a dataclass, its checks and choices), registered
      with the family, so YAML, overrides, ``flaxlm config show`` and the one-line errors
      know them without an edit to flaxlm/config/.
    """

    name: str
    build_model: Callable[..., Any]
    batch_keys: Callable[[Config, bool], tuple[str, ...]]
    train_batches: Callable[..., Any]
    eval_batches: Callable[..., Any]
    zero_metrics: Callable[[Config, dict], dict]
    loss_scales: Callable[[Config, dict], Any]
    loss: Callable[..., tuple[Any, dict]]
    summarize: Callable[..., dict]
    log_fields: Callable[[Config, dict], dict[str, float]]
    eval_report: Callable[[Config, dict], dict[str, Any]]
    synthetic_batch: Callable[[Config, np.random.Generator], dict[str, np.ndarray]]
    inspect_sample: Callable[..., dict]
    baseline: Callable[..., Baseline | None] = lambda cfg, tok, train, split: None
    report_fields: tuple[ReportField, ...] = ()
    headline: tuple[str, ...] = ()
    predicted_positions: Callable[[Config], int] = lambda cfg: cfg.data.seq_len
    converters: tuple[Any, ...] = ()
    generates: bool = False
    classifies: bool = False
    encoder_decoder: bool = False
    check_config: Callable[[Config], None] = lambda cfg: None
    config_sections: tuple[ConfigSection, ...] = ()
    task_scoring: TaskScoring | None = None
    flop_count: Callable[[Config], FlopCount] | None = None


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family, replace: bool = False) -> Family:
    """Adds ``family`` to the table under ``family.name`` (``model.family`` selects it), and
    its ``config_sections`` to every config loaded from now on (load the config after this).
    Registering a taken name raises unless ``replace``. Returns the family."""
    if not family.name or not isinstance(family.name, str):
        raise ValueError(f"a family needs a non-empty name, got {family.name!r}")
    if family.name in _FAMILIES and not replace:
        raise ValueError(f"family {family.name!r} is already registered (pass replace=True)")
    for section in family.config_sections:
        register_section(section, replace=replace)
    _FAMILIES[family.name] = family
    return family


def registered_families() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def get_family(name: str) -> Family:
    """The family registered as ``name``; ConfigError naming the registered ones if none."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"model.family={name!r} is not one of {', '.join(_FAMILIES)} "
            "(register your own with flaxlm.families.register_family)"
        ) from None


def family_of(cfg: Config) -> Family:
    """The family of ``cfg.model.family``, after its own config checks."""
    family = get_family(cfg.model.family)
    family.check_config(cfg)
    return family


def build_model(model_cfg: Any) -> Any:
    """The flax module of ``model_cfg.family`` (a ModelConfig)."""
    return get_family(model_cfg.family).build_model(model_cfg)


def summary_line(record: dict[str, Any], family: Family) -> str:
    """``val_loss 3.2100, perplexity 24.8`` — the family's headline fields present in
    ``record``."""
    parts = [f"val_loss {record['val_loss']:.4f}"]
    parts += [f"{k} {record[k]:.4g}" for k in family.headline if k in record]
    return ", ".join(parts)


def report_lines(report: dict[str, Any], family: Family) -> list[str]:
    """The family's report fields present in ``report``, as aligned ``label  value`` lines."""
    return [
        f"{f.label:<21}{f.format(report[f.key])}" for f in family.report_fields if f.key in report
    ]
