"""BERT masking: which tokens a masked-LM example predicts, and what the model sees there.

Of the non-special tokens of a sequence, ``mask_prob`` (15 %) are chosen, at most
``max_predictions``; of the chosen, ``mask_token_prob`` (80 %) become ``[MASK]``,
``random_token_prob`` (10 %) a random non-special token, the rest stay unchanged. Special
tokens (``<pad> <unk> <s> </s> [CLS] [SEP] [MASK]``) are never chosen. With ``whole_word`` the
pieces of one word (a sentencepiece piece starting with "▁" opens a word) are chosen together.

Masks are a pure function of (seed, global example index): the generator of example g is
``np.random.default_rng([seed, MASK_STREAM, g])`` (Philox-free, counter-like seeding: no state
carries from one example to the next), so resume and rollback see the same masks, and the same
text met again in a later epoch (another g) gets a different mask.

    spec = MaskingSpec.from_tokenizer(tokenizer, cfg.objective, seq_len=128)
    out = mask_batch(tokens_NxL, global_ids_N, spec, seed=0)
    out["inputs"], out["masked_positions"], out["masked_ids"], out["masked_weights"]

The ``objective`` config section (:class:`ObjectiveConfig`) is declared here, with the lowest
module that reads it; the ``bert`` family entry registers it (:data:`OBJECTIVE_SECTION`), so
the config package never names it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from flaxlm.config import ConfigError, ConfigSection
from flaxlm.tokenizers.sentencepiece import Tokenizer

MASK_STREAM = 0x6D61736B  # separates the masking generators from every other seeded stream


@dataclass
class ObjectiveConfig:
    """What a ``model.family: bert`` run learns (the ``objective`` config section; see
    masked_batches.py, pairs.py and flaxlm/families/bert.py). GPT runs always train the causal
    LM loss."""

    # Shares of examples per objective (normalised over the non-zero ones). Pure MLM (the
    # default) is BERT; any causal / prefix_lm share makes a unified run, in which each example
    # draws its objective and its attention mask follows it.
    mlm: float = 1.0
    causal: float = 0.0
    prefix_lm: float = 0.0
    nsp: bool = True  # [CLS] A [SEP] B [SEP] pairs + NSP loss; false = full packed rows (RoBERTa)
    nsp_weight: float = 1.0  # the NSP loss is added to the MLM loss with this weight
    mask_prob: float = 0.15  # share of (non-special) tokens chosen for prediction
    mask_token_prob: float = 0.8  # of the chosen: -> [MASK]
    random_token_prob: float = 0.1  # of the chosen: -> a random token (the rest stay unchanged)
    whole_word: bool = False  # mask all pieces of a word (sentencepiece "▁" starts a word)
    max_predictions: int = 0  # per sequence; 0 = ceil(mask_prob * seq_len)


def check_objective(cfg: Any) -> None:
    """Ranges of the ``objective`` keys; what the BERT family needs of them together (one
    share > 0, NSP only with pure MLM) is its ``check_config``."""
    ob = cfg.objective
    for key in ("mlm", "causal", "prefix_lm"):
        if getattr(ob, key) < 0:
            raise ConfigError(f"objective.{key}={getattr(ob, key)} must be >= 0")
    if not 0.0 < ob.mask_prob < 1.0:
        raise ConfigError(f"objective.mask_prob={ob.mask_prob} must be in (0, 1)")
    if ob.mask_token_prob < 0 or ob.random_token_prob < 0:
        raise ConfigError("objective.mask_token_prob and random_token_prob must be >= 0")
    if ob.mask_token_prob + ob.random_token_prob > 1.0:
        raise ConfigError(
            f"objective.mask_token_prob + random_token_prob = "
            f"{ob.mask_token_prob + ob.random_token_prob} must be <= 1"
        )
    if ob.max_predictions < 0:
        raise ConfigError(f"objective.max_predictions={ob.max_predictions} must be >= 0")


# Registered by the bert family entry (flaxlm/families/bert.py): ``cfg.objective``.
OBJECTIVE_SECTION = ConfigSection("objective", ObjectiveConfig, check=check_objective)


@dataclass(frozen=True)
class MaskingSpec:
    """Masking settings plus the per-vocabulary-id tables they need.

    ``is_special``, ``word_start``: (V,) bool over token ids; ``random_ids``: the ids a
    "random token" replacement draws from (every non-special id).
    """

    mask_prob: float
    mask_token_prob: float
    random_token_prob: float
    whole_word: bool
    max_predictions: int
    mask_id: int
    is_special: np.ndarray
    word_start: np.ndarray
    random_ids: np.ndarray

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Tokenizer, cfg: ObjectiveConfig, seq_len: int
    ) -> MaskingSpec:
        if tokenizer.mask_id is None:
            raise ValueError(
                f"tokenizer {tokenizer.source} has no [MASK] token; masked-LM needs one: "
                'append it with data.tokenizer_specials={mask: "[MASK]"}'
            )
        vocab = tokenizer.vocab_size
        special_ids = [
            i
            for i in (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id,
                      tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id)
            if i is not None
        ]  # fmt: skip
        is_special = np.zeros(vocab, dtype=bool)
        is_special[special_ids] = True
        word_start = tokenizer.word_starts()
        return cls(
            mask_prob=cfg.mask_prob,
            mask_token_prob=cfg.mask_token_prob,
            random_token_prob=cfg.random_token_prob,
            whole_word=cfg.whole_word,
            max_predictions=resolve_max_predictions(cfg, seq_len),
            mask_id=tokenizer.mask_id,
            is_special=is_special,
            word_start=word_start,
            random_ids=np.flatnonzero(~is_special),
        )


def resolve_max_predictions(cfg: ObjectiveConfig, seq_len: int) -> int:
    """``objective.max_predictions``, or ``ceil(mask_prob * seq_len)`` when it is 0."""
    return cfg.max_predictions or max(1, math.ceil(cfg.mask_prob * seq_len))


def word_ids(tokens_L: np.ndarray, candidates_L: np.ndarray, spec: MaskingSpec) -> np.ndarray:
    """(C,) the word index of each candidate position (in order). Without whole-word
    masking every candidate is its own word. A word starts at a "▁" piece or after a
    non-candidate (a special token)."""
    positions = np.flatnonzero(candidates_L)
    if not spec.whole_word:
        return np.arange(len(positions))
    is_new = spec.word_start[tokens_L[positions]] | (np.diff(positions, prepend=-2) != 1)
    return np.cumsum(is_new) - 1


def mask_tokens(
    tokens_L: np.ndarray, spec: MaskingSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks one sequence.

    Returns (inputs_L, positions_K, original_ids_K): the sequence as the model sees it, and
    the K <= max_predictions chosen positions (ascending) with their original tokens.
    """
    tokens_L = np.asarray(tokens_L, dtype=np.int64)
    candidates_L = ~spec.is_special[tokens_L]
    positions = np.flatnonzero(candidates_L)
    inputs_L = tokens_L.copy()
    if len(positions) == 0:
        return inputs_L, positions, positions
    n_predict = min(spec.max_predictions, max(1, round(len(positions) * spec.mask_prob)))
    words = word_ids(tokens_L, candidates_L, spec)
    n_words = int(words[-1]) + 1
    if spec.whole_word:
        starts = np.searchsorted(words, np.arange(n_words))
        ends = np.append(starts[1:], len(words))
        chosen, total = [], 0
        # BERT's rule: take words in random order; skip one that would overshoot the budget.
        for w in rng.permutation(n_words):
            size = int(ends[w] - starts[w])
            if total + size > n_predict:
                continue
            chosen.append(positions[starts[w] : ends[w]])
            total += size
            if total == n_predict:
                break
        picked = np.sort(np.concatenate(chosen)) if chosen else positions[:0]
    else:
        picked = np.sort(positions[rng.permutation(len(positions))[:n_predict]])
    u = rng.random(len(picked))
    replacement = spec.random_ids[rng.integers(0, len(spec.random_ids), len(picked))]
    to_mask = u < spec.mask_token_prob
    to_random = (u >= spec.mask_token_prob) & (u < spec.mask_token_prob + spec.random_token_prob)
    inputs_L[picked[to_mask]] = spec.mask_id
    inputs_L[picked[to_random]] = replacement[to_random]
    return inputs_L, picked, tokens_L[picked]


def mask_batch(
    tokens_NxL: np.ndarray, global_ids_N: np.ndarray, spec: MaskingSpec, seed: int
) -> dict[str, np.ndarray]:
    """Masks each row with its own generator ``default_rng([seed, MASK_STREAM, g])``.

    Returns ``inputs`` (N, L) int32 and the gathered predictions, padded to
    P = ``max_predictions``: ``masked_positions`` (N, P) int32, ``masked_ids`` (N, P) int32,
    ``masked_weights`` (N, P) float32 (1 = a real prediction).
    """
    n, _ = tokens_NxL.shape
    p = spec.max_predictions
    inputs = np.empty(tokens_NxL.shape, dtype=np.int32)
    positions = np.zeros((n, p), dtype=np.int32)
    ids = np.zeros((n, p), dtype=np.int32)
    weights = np.zeros((n, p), dtype=np.float32)
    for row, g in enumerate(np.asarray(global_ids_N, dtype=np.int64)):
        rng = np.random.default_rng([seed, MASK_STREAM, int(g)])
        inputs[row], pos_K, ids_K = mask_tokens(tokens_NxL[row], spec, rng)
        k = len(pos_K)
        positions[row, :k], ids[row, :k], weights[row, :k] = pos_K, ids_K, 1.0
    return {
        "inputs": inputs,
        "masked_positions": positions,
        "masked_ids": ids,
        "masked_weights": weights,
    }
