"""T5's span corruption, and the ``seq2seq`` config section of ``model.family: t5``.

Span corruption as the T5 paper describes it (Raffel et al. 2020, §3.1.4 and the reference
preprocessing): of a run of ``n`` raw tokens, ``round(n * noise_density)`` are noise, in
``round(noise / mean_span_length)`` spans. The noise tokens and the non-noise tokens are each
cut into that many non-empty spans at uniformly random cut points (a random segmentation), and
the spans interleave starting with a non-noise span, so every row ends in a noise span. Each
noise span is replaced in the encoder input by one sentinel; the decoder target is each
sentinel followed by the span it replaced, then ``</s>``:

    tokens   a b c d e f g h          noise: c d, g h
    encoder  a b <X0> e f <X1> </s>
    target   <X0> c d <X1> g h </s>

Sentinels are the T5 "extra ids": ``seq2seq.extra_ids`` ids appended after the tokenizer's
vocabulary, the first span's sentinel the highest id (``<extra_id_0>`` =
``tokenizer.vocab_size + extra_ids - 1``, the next one below it). ``model.vocab_size`` must
hold them: ``>= tokenizer.vocab_size + seq2seq.extra_ids``.

Lengths as T5 derives them: the encoder row is ``data.seq_len`` tokens (``inputs_length``);
the raw run that corrupts into exactly that is the longest ``n`` whose corrupted input
(non-noise tokens + one sentinel per span + ``</s>``) fits, and ``seq2seq.target_len: 0``
takes the matching target length (noise tokens + one sentinel per span + ``</s>``); e.g. 512
-> runs of 568 tokens, targets of 114.

Noise masks are a pure function of (seed, global example index g): the generator of example g
is ``np.random.default_rng([seed, SPAN_STREAM, g])``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flaxlm.config import ConfigError, ConfigSection

SPAN_STREAM = 0x7370616E  # "span": separates the noise-mask generators from other streams
TASKS = ("span_corruption", "pairs")


@dataclass
class Seq2SeqConfig:
    """What a ``model.family: t5`` run learns (the ``seq2seq`` config section)."""

    task: str = "span_corruption"  # span_corruption (pretraining) | pairs (input -> target)
    noise_density: float = 0.15  # share of raw tokens that are noise (T5: 0.15)
    mean_span_length: float = 3.0  # mean length of a noise span (T5: 3)
    target_len: int = 0  # decoder length; 0 = T5's derivation from data.seq_len (pairs: seq_len)
    extra_ids: int = 100  # sentinel ids appended after the tokenizer's vocabulary (T5: 100)
    input_column: str = "input"  # pairs: the CSV/JSONL column of encoder text
    target_column: str = "target"  # pairs: the CSV/JSONL column of decoder text


def check_seq2seq(cfg: Any) -> None:
    """Ranges of the ``seq2seq`` keys (the task's choices are the section's ``choices``)."""
    s = cfg.seq2seq
    if not 0.0 < s.noise_density < 1.0:
        raise ConfigError(f"seq2seq.noise_density={s.noise_density} must be in (0, 1)")
    if s.mean_span_length < 1.0:
        raise ConfigError(f"seq2seq.mean_span_length={s.mean_span_length} must be >= 1")
    if s.target_len < 0:
        raise ConfigError(f"seq2seq.target_len={s.target_len} must be >= 0 (0 = derived)")
    if s.extra_ids < 1:
        raise ConfigError(f"seq2seq.extra_ids={s.extra_ids} must be >= 1")
    if not s.input_column or not s.target_column or s.input_column == s.target_column:
        raise ConfigError(
            f"seq2seq.input_column={s.input_column!r} and seq2seq.target_column="
            f"{s.target_column!r} must be two different non-empty column names"
        )


# Registered by the t5 family entry (flaxlm/families/t5.py): ``cfg.seq2seq``.
SEQ2SEQ_SECTION = ConfigSection(
    "seq2seq", Seq2SeqConfig, check=check_seq2seq, choices={"task": TASKS}
)


def corrupted_lengths(n_tokens: int, noise_density: float, mean_span_length: float) -> tuple:
    """(encoder length, target length) of a run of ``n_tokens`` raw tokens after corruption,
    each with its ``</s>``."""
    n_noise = int(round(n_tokens * noise_density))
    n_spans = int(round(n_noise / mean_span_length))
    return n_tokens - n_noise + n_spans + 1, n_noise + n_spans + 1


def raw_and_target_len(
    inputs_len: int, noise_density: float, mean_span_length: float
) -> tuple[int, int]:
    """(raw run length, target length) for encoder rows of ``inputs_len`` tokens: the longest
    run whose corruption fits, as T5 sizes its span-corruption examples."""
    n = inputs_len - 1
    while corrupted_lengths(n + 1, noise_density, mean_span_length)[0] <= inputs_len:
        n += 1
    _, target_len = corrupted_lengths(n, noise_density, mean_span_length)
    if noise_density == 0.5 and target_len > inputs_len:  # T5 keeps targets <= inputs here
        n -= 1
        target_len -= 1
    return n, target_len


def resolve_target_len(cfg: Any) -> int:
    """``seq2seq.target_len``, or its derivation when 0 (pairs: ``data.seq_len``)."""
    s = cfg.seq2seq
    if s.target_len:
        return s.target_len
    if s.task == "pairs":
        return cfg.data.seq_len
    return raw_and_target_len(cfg.data.seq_len, s.noise_density, s.mean_span_length)[1]


def sentinel_ids(tokenizer_vocab: int, extra_ids: int) -> np.ndarray:
    """(extra_ids,) the sentinel of span i at index i: highest id first, as T5's extra ids."""
    return tokenizer_vocab + extra_ids - 1 - np.arange(extra_ids, dtype=np.int64)


def random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """(n_segments,) lengths >= 1 summing to ``n_items``: ``n_segments - 1`` cut points drawn
    without replacement from the ``n_items - 1`` gaps, uniformly."""
    cuts = np.zeros(n_items - 1, dtype=bool)
    cuts[: n_segments - 1] = True
    rng.shuffle(cuts)
    segment = np.concatenate([[0], np.cumsum(cuts)])
    return np.bincount(segment, minlength=n_segments)


def noise_mask(
    length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """(length,) bool: which tokens are noise. At least one noise and one kept token (for
    length >= 2), spans interleaved kept-first, so the row ends in noise."""
    work = max(length, 2)
    n_noise = min(max(int(round(work * noise_density)), 1), work - 1)
    n_spans = max(int(round(n_noise / mean_span_length)), 1)
    noise_lengths = random_segmentation(n_noise, n_spans, rng)
    kept_lengths = random_segmentation(work - n_noise, n_spans, rng)
    spans = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise = np.repeat(np.arange(2 * n_spans) % 2 == 1, spans)
    return is_noise[:length]


def corrupt(
    tokens: np.ndarray, is_noise: np.ndarray, sentinels: np.ndarray, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(encoder ids, target ids) of one run, each ending in ``eos_id``: every noise span
    becomes its sentinel in the input; the target is each sentinel and then its span."""
    tokens = np.asarray(tokens, dtype=np.int64)
    starts = is_noise & ~np.concatenate([[False], is_noise[:-1]])
    n_spans = int(starts.sum())
    if n_spans > len(sentinels):
        raise ValueError(
            f"{n_spans} noise spans need more than seq2seq.extra_ids={len(sentinels)} "
            "sentinels; raise seq2seq.extra_ids or shorten data.seq_len"
        )
    span_of = np.cumsum(starts) - 1  # the span index of each noise token
    with_sentinel = np.where(starts, sentinels[np.maximum(span_of, 0)], tokens)
    inputs = with_sentinel[~is_noise | starts]
    noise = np.flatnonzero(is_noise)
    slots = np.arange(len(noise)) + np.cumsum(starts[noise])  # each span shifted past sentinels
    target = np.empty(len(noise) + n_spans, dtype=np.int64)
    target[slots] = tokens[noise]
    opening = starts[noise]
    target[slots[opening] - 1] = sentinels[span_of[noise][opening]]
    return np.append(inputs, eos_id), np.append(target, eos_id)
