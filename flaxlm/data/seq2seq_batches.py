"""Step-indexed encoder–decoder batches for ``model.family: t5``: span corruption and pairs.

Every batch holds (numpy, shapes ``(rows, S)`` for the encoder, ``(rows, T)`` for the decoder,
S = ``data.seq_len``, T = the target length, flaxlm/data/span_corruption.py):

- ``encoder_ids``, ``encoder_segment_ids`` (0 = padding, 1.. = the packed example's index in
  its row), ``encoder_positions`` (from 0 in each segment);
- ``decoder_input_ids`` (each segment's targets shifted right, starting with the decoder start
  token, the pad id 0 as in T5), ``decoder_target_ids``, ``decoder_segment_ids`` (segment j of
  the decoder row belongs to segment j of the encoder row; 0 = padding),
  ``decoder_positions``; ``decoder_loss_mask`` float32, 1 on real target tokens.

Two sources of examples, both with the :class:`~flaxlm.data.causal_batches.EpochOrder`
contract (global example ``g = step * B + row`` is example ``perm_e[g % N]`` of epoch
``e = g // N``), so the batch of step k is a pure function of (seed, k) and each process
builds only its rows:

- :class:`SpanCorruptionBatches`: example i is the run of R raw tokens
  ``stream[i*R : (i+1)*R]`` (documents concatenated, as T5 does), corrupted with the noise
  mask drawn from ``default_rng([seed, SPAN_STREAM, g])``: one segment per row.
- :class:`PairBatches`: encoded (input, target) pairs, packed once, in file order, into rows
  (next fit: a pair joins the current row while both sides still fit); example i is row i.

    batches = make_seq2seq_batches(prepared.train, cfg, prepared.tokenizer, ramp.full)
    batch = batches.batch(step, jax.process_index(), jax.process_count())
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from flaxlm.config import Config, ConfigError
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.causal_batches import EpochOrder, padded_eval_batches, ramp_rows
from flaxlm.data.span_corruption import (
    SPAN_STREAM,
    corrupt,
    noise_mask,
    raw_and_target_len,
    resolve_target_len,
    sentinel_ids,
)
from flaxlm.data.token_split import TokenSplit
from flaxlm.tokenizers.sentencepiece import Tokenizer

ENCODER_KEYS = ("encoder_ids", "encoder_segment_ids", "encoder_positions")
DECODER_KEYS = ("decoder_input_ids", "decoder_target_ids", "decoder_segment_ids",
                "decoder_positions", "decoder_loss_mask")  # fmt: skip
SEQ2SEQ_KEYS = ENCODER_KEYS + DECODER_KEYS

Example = tuple[np.ndarray, np.ndarray]  # (encoder ids, target ids), each ending in </s>


def assemble_rows(
    rows: Sequence[Sequence[Example]], seq_len: int, target_len: int, start_id: int = 0
) -> dict[str, np.ndarray]:
    """The batch arrays (module doc) of ``rows``, each a list of examples packed left to right.
    ValueError when a row's examples overflow either side."""
    n = len(rows)
    out = {k: np.zeros((n, seq_len), np.int32) for k in ENCODER_KEYS}
    out |= {k: np.zeros((n, target_len), np.int32) for k in DECODER_KEYS}
    out["decoder_loss_mask"] = np.zeros((n, target_len), np.float32)
    for r, examples in enumerate(rows):
        enc_at = dec_at = 0
        for seg, (enc, tgt) in enumerate(examples, start=1):
            ne, nt = len(enc), len(tgt)
            if enc_at + ne > seq_len or dec_at + nt > target_len:
                raise ValueError(
                    f"row {r}: {enc_at + ne} encoder / {dec_at + nt} target tokens overflow "
                    f"seq_len={seq_len} / target_len={target_len}"
                )
            e, d = slice(enc_at, enc_at + ne), slice(dec_at, dec_at + nt)
            out["encoder_ids"][r, e] = enc
            out["encoder_segment_ids"][r, e] = seg
            out["encoder_positions"][r, e] = np.arange(ne)
            out["decoder_target_ids"][r, d] = tgt
            out["decoder_input_ids"][r, d] = np.concatenate([[start_id], tgt[:-1]])
            out["decoder_segment_ids"][r, d] = seg
            out["decoder_positions"][r, d] = np.arange(nt)
            out["decoder_loss_mask"][r, d] = 1.0
            enc_at, dec_at = enc_at + ne, dec_at + nt
    return out


class _Seq2SeqBatches(EpochOrder):
    """What both kinds share: ``build(global_ids)`` makes the rows; ``batch`` and
    ``eval_batches`` as in :class:`~flaxlm.data.causal_batches.CausalBatches`."""

    seq_len: int
    target_len: int
    ramp: BatchRamp

    def build(self, global_ids: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def batch(
        self, step: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``step`` (global rows from
        ``ramp.offset(step)``, ``ramp.size(step)`` of them)."""
        return self.build(ramp_rows(self.ramp, step, process_index, process_count))

    def eval_batches(
        self, batch_size: int, max_batches: int = 0, process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
        """Walks the examples in order (use ``shuffle=False``), ``batch_size`` at a time; the
        last batch is padded with rows whose segment ids and loss masks are 0."""
        return padded_eval_batches(
            self.build, self.n_examples, batch_size, max_batches, process_index, process_count
        )


class SpanCorruptionBatches(_Seq2SeqBatches):
    """Span-corrupted runs of a token split (module doc); ``raw_len`` tokens per example."""

    def __init__(
        self, split: TokenSplit, seq_len: int, target_len: int, global_batch: int, seed: int,
        tokenizer: Tokenizer, noise_density: float = 0.15, mean_span_length: float = 3.0,
        extra_ids: int = 100, shuffle: bool = True, ramp: BatchRamp | None = None,
    ):  # fmt: skip
        self.split, self.seq_len, self.seed, self.shuffle = split, seq_len, seed, shuffle
        self.global_batch = global_batch
        self.ramp = BatchRamp.or_constant(ramp, global_batch)
        self.order = split.order
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.raw_len, needed = raw_and_target_len(seq_len, noise_density, mean_span_length)
        if target_len < needed:
            raise ConfigError(
                f"seq2seq.target_len={target_len} is too short for span corruption of "
                f"data.seq_len={seq_len}: its targets take {needed} tokens (0 = derive it)"
            )
        self.target_len = target_len
        self.sentinels = sentinel_ids(tokenizer.vocab_size, extra_ids)
        self.eos_id, self.start_id = tokenizer.eos_id, tokenizer.pad_id
        self.n_examples = split.n_tokens // self.raw_len
        if self.n_examples == 0:
            raise ValueError(
                f"{split.name} split has {split.n_tokens} tokens, too few for one span-"
                f"corruption example of seq_len={seq_len} (needs {self.raw_len} raw tokens)"
            )
        self._perms: dict[int, np.ndarray] = {}

    def example(self, example_id: int, global_id: int) -> Example:
        """Run ``example_id`` corrupted with the noise mask of global example ``global_id``."""
        start = int(example_id) * self.raw_len
        tokens = np.asarray(self.split.tokens[start : start + self.raw_len], dtype=np.int64)
        rng = np.random.default_rng([self.seed, SPAN_STREAM, int(global_id)])
        mask = noise_mask(self.raw_len, self.noise_density, self.mean_span_length, rng)
        return corrupt(tokens, mask, self.sentinels, self.eos_id)

    def build(self, global_ids: np.ndarray) -> dict[str, np.ndarray]:
        global_ids = np.asarray(global_ids, dtype=np.int64)
        ids = self.example_ids(global_ids)
        rows = [[self.example(i, g)] for i, g in zip(ids, global_ids, strict=True)]
        return assemble_rows(rows, self.seq_len, self.target_len, self.start_id)


def encode_pair(
    input_ids: Sequence[int], target_ids: Sequence[int], seq_len: int, target_len: int,
    eos_id: int, where: str = "",
) -> Example:  # fmt: skip
    """One (input, target) pair with ``</s>`` appended to each side. A too long input keeps its
    first ``seq_len - 1`` tokens (as T5 truncates inputs); a too long target is an error."""
    if len(target_ids) + 1 > target_len:
        raise ValueError(
            f"{where or 'pair'}: target of {len(target_ids)} tokens (+ </s>) is longer than "
            f"seq2seq.target_len={target_len}; raise it or shorten the target"
        )
    enc = np.append(np.asarray(input_ids[: seq_len - 1], np.int64), eos_id)
    return enc, np.append(np.asarray(target_ids, np.int64), eos_id)


def pack_pairs(examples: Sequence[Example], seq_len: int, target_len: int) -> list[list[int]]:
    """Next-fit packing in order: the example indices of each row."""
    rows: list[list[int]] = []
    enc_used = dec_used = seq_len + 1  # forces a first row
    for i, (enc, tgt) in enumerate(examples):
        if enc_used + len(enc) > seq_len or dec_used + len(tgt) > target_len:
            rows.append([])
            enc_used = dec_used = 0
        rows[-1].append(i)
        enc_used, dec_used = enc_used + len(enc), dec_used + len(tgt)
    return rows


class PairBatches(_Seq2SeqBatches):
    """Packed (input, target) pairs (module doc); ``pack=False`` puts one pair per row."""

    def __init__(
        self, examples: Sequence[Example], seq_len: int, target_len: int, global_batch: int,
        seed: int, start_id: int = 0, pack: bool = True, shuffle: bool = True,
        ramp: BatchRamp | None = None,
    ):  # fmt: skip
        if not examples:
            raise ValueError("no (input, target) pairs to make batches of")
        self.examples = list(examples)
        self.seq_len, self.target_len, self.seed, self.shuffle = seq_len, target_len, seed, shuffle
        self.global_batch, self.start_id = global_batch, start_id
        self.ramp = BatchRamp.or_constant(ramp, global_batch)
        if pack:
            self.rows = pack_pairs(self.examples, seq_len, target_len)
        else:
            self.rows = [[i] for i in range(len(self.examples))]
        self.n_examples = len(self.rows)
        self._perms: dict[int, np.ndarray] = {}

    def build(self, global_ids: np.ndarray) -> dict[str, np.ndarray]:
        ids = self.example_ids(np.asarray(global_ids, dtype=np.int64))
        rows = [[self.examples[j] for j in self.rows[i]] for i in ids]
        return assemble_rows(rows, self.seq_len, self.target_len, self.start_id)


def make_seq2seq_batches(
    split: TokenSplit, cfg: Config, tokenizer: Tokenizer, global_batch: int,
    seed: int | None = None, shuffle: bool = True, ramp: BatchRamp | None = None,
) -> SpanCorruptionBatches:  # fmt: skip
    """Span-corruption batches of a token split, by ``cfg.seq2seq`` (what a t5 run trains
    and evaluates on; pairs come from a CSV/JSONL, flaxlm/data/seq2seq_pairs.py)."""
    s = cfg.seq2seq
    if s.task != "span_corruption":
        raise ConfigError(
            f"seq2seq.task={s.task!r}: pretraining on a token corpus needs span_corruption; "
            "train on (input, target) pairs with flaxlm finetune"
        )
    return SpanCorruptionBatches(
        split, cfg.data.seq_len, resolve_target_len(cfg), global_batch,
        cfg.train.seed if seed is None else seed, tokenizer, s.noise_density,
        s.mean_span_length, s.extra_ids, shuffle, ramp,
    )  # fmt: skip
