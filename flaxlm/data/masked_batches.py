"""Step-indexed batches for ``model.family: bert``: MLM (+ NSP) and the unified objective.

The same contract as :class:`~flaxlm.data.causal_batches.CausalBatches`: global example
``g = step * B + row`` is example ``perm_e[g % N]`` of epoch ``e = g // N``; everything random
about it (the pair, the mask, the objective) is drawn from generators seeded by ``(seed, g)``.
So the batch of step k is a pure function of (seed, k), resume and rollback see the same masks,
and each process builds only its rows. Three layouts, chosen by ``cfg.objective``:

- ``nsp`` (BERT): ``[CLS] A [SEP] B [SEP]`` pairs (flaxlm/data/pairs.py), masked.
- ``mlm`` (RoBERTa-style, ``objective.nsp: false``): ``[CLS]`` + ``seq_len - 1`` tokens of the
  packed stream, crossing documents (segment ids keep attention within each), masked.
- ``unified`` (a causal or prefix_lm share): packed windows as for GPT; each row draws its
  objective by the configured shares: MLM rows are masked and predict the original token in
  place, causal rows the next token, prefix-LM rows the next token after a random prefix
  length ``p`` in [1, S - 1] over which attention is bidirectional.

    batches = make_masked_batches(prepared.train, cfg, prepared.tokenizer, cfg.train.batch_size)
    batch = batches.batch(step, jax.process_index(), jax.process_count())
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from flaxlm.config import Config
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.causal_batches import (
    EpochOrder,
    n_causal_examples,
    pack_examples,
    padded_eval_batches,
    ramp_rows,
)
from flaxlm.data.mlm_masks import MaskingSpec, mask_batch
from flaxlm.data.pairs import PairChunks, build_pairs
from flaxlm.data.token_split import TokenSplit
from flaxlm.tokenizers.sentencepiece import Tokenizer

OBJECTIVES = ("mlm", "causal", "prefix_lm")  # objective ids 0, 1, 2 of unified batches
OBJECTIVE_STREAM = 0x6F626A  # "obj"
MLM_KEYS = ("inputs", "positions", "segment_ids", "masked_positions", "masked_ids",
            "masked_weights")  # fmt: skip
NSP_KEYS = (*MLM_KEYS, "token_types", "nsp_labels", "nsp_weights")
UNIFIED_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "prefix_len",
                "objective_ids")  # fmt: skip


def layout_of(cfg: Config) -> str:
    """``nsp``, ``mlm`` or ``unified`` (see the module doc)."""
    ob = cfg.objective
    if ob.causal or ob.prefix_lm:
        return "unified"
    return "nsp" if ob.nsp else "mlm"


def batch_keys(cfg: Config) -> tuple[str, ...]:
    return {"nsp": NSP_KEYS, "mlm": MLM_KEYS, "unified": UNIFIED_KEYS}[layout_of(cfg)]


class MaskedBatches(EpochOrder):
    """Step-indexed masked-LM / NSP / unified batches from one split (see the module doc).

    ``batch(step, p, P)`` and ``eval_batches(batch_size, max_batches, p, P)`` behave as in
    CausalBatches; every array is ``(rows, X)`` with X = S, P (predictions) or 1.
    """

    def __init__(
        self,
        split: TokenSplit,
        layout: str,
        seq_len: int,
        global_batch: int,
        seed: int,
        spec: MaskingSpec,
        tokenizer: Tokenizer,
        shares: tuple[float, float, float] = (1.0, 0.0, 0.0),
        shuffle: bool = True,
        ramp: BatchRamp | None = None,
    ):
        if layout not in ("nsp", "mlm", "unified"):
            raise ValueError(f"layout={layout!r} is not one of nsp, mlm, unified")
        if tokenizer.cls_id is None or tokenizer.sep_id is None:
            raise ValueError(f"tokenizer {tokenizer.source} has no [CLS]/[SEP]; BERT needs both")
        self.split, self.layout, self.seq_len = split, layout, seq_len
        self.global_batch, self.seed, self.shuffle = global_batch, seed, shuffle
        self.ramp = BatchRamp.or_constant(ramp, global_batch)  # train.batch_ramp
        self.order = split.order
        self.spec, self.tokenizer = spec, tokenizer
        shares_O = np.asarray(shares, dtype=np.float64)
        self.cum_shares = np.cumsum(shares_O / shares_O.sum())
        self.keys = {"nsp": NSP_KEYS, "mlm": MLM_KEYS, "unified": UNIFIED_KEYS}[layout]
        if layout == "nsp":
            self.chunks = PairChunks(split, seq_len)
            self.n_examples = len(self.chunks)
        else:
            # mlm rows hold [CLS] + S - 1 stream tokens; unified rows S tokens (+1 target).
            self.window = seq_len - 1 if layout == "mlm" else seq_len
            self.n_examples = n_causal_examples(split.n_tokens, self.window)
        if self.n_examples == 0:
            raise ValueError(
                f"{split.name} split has {split.n_tokens} tokens, too few for one example of "
                f"seq_len={seq_len}"
            )
        self._perms: dict[int, np.ndarray] = {}

    def build(self, global_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The rows of these global example indices."""
        global_ids = np.asarray(global_ids, dtype=np.int64)
        ids = self.example_ids(global_ids)
        tok = self.tokenizer
        if self.layout == "nsp":
            rows = build_pairs(
                self.chunks, ids, global_ids, self.seed, tok.cls_id, tok.sep_id, tok.pad_id
            )
            rows.pop("random_doc")
            rows.update(mask_batch(rows["inputs"], global_ids, self.spec, self.seed))
            return rows
        packed = pack_examples(self.split.tokens, self.split.doc_offsets, ids, self.window)
        if self.layout == "mlm":
            return self._mlm_rows(packed, global_ids)
        return self._unified_rows(packed, global_ids)

    def _mlm_rows(self, packed: dict, global_ids: np.ndarray) -> dict[str, np.ndarray]:
        n = len(global_ids)
        cls_N1 = np.full((n, 1), self.tokenizer.cls_id, dtype=np.int32)
        tokens = np.concatenate([cls_N1, packed["inputs"]], axis=1)
        # [CLS] joins the first document of the row, at position 0; that document's
        # positions shift by one.
        first_NxS = packed["segment_ids"] == 1
        positions = np.where(first_NxS, packed["positions"] + 1, packed["positions"])
        rows = {
            "positions": np.concatenate([np.zeros((n, 1), np.int32), positions], axis=1),
            "segment_ids": np.concatenate(
                [np.ones((n, 1), np.int32), packed["segment_ids"]], axis=1
            ),
        }
        rows.update(mask_batch(tokens, global_ids, self.spec, self.seed))
        return rows

    def _unified_rows(self, packed: dict, global_ids: np.ndarray) -> dict[str, np.ndarray]:
        n, S = packed["inputs"].shape
        objective = np.empty(n, dtype=np.int32)
        prefix = np.empty(n, dtype=np.int32)
        for row, g in enumerate(global_ids):
            rng = np.random.default_rng([self.seed, OBJECTIVE_STREAM, int(g)])
            objective[row] = np.searchsorted(self.cum_shares, rng.random(), side="right")
            prefix[row] = rng.integers(1, S)
        objective = np.minimum(objective, len(OBJECTIVES) - 1)  # float round-off at the top
        prefix = np.where(objective == 0, S, np.where(objective == 1, 0, prefix))
        inputs, targets = packed["inputs"].copy(), packed["targets"].copy()
        loss_mask = packed["loss_mask"].copy()
        # prefix-LM: position t sees tokens < p, so it may predict only targets t + 1 >= p.
        loss_mask[np.arange(S)[None, :] < prefix[:, None] - 1] = 0.0
        is_mlm = objective == 0
        if is_mlm.any():
            masked = mask_batch(packed["inputs"][is_mlm], global_ids[is_mlm], self.spec, self.seed)
            inputs[is_mlm] = masked["inputs"]
            mlm_targets = packed["inputs"][is_mlm].copy()
            mlm_mask = np.zeros(mlm_targets.shape, np.float32)
            rows_K = np.repeat(np.arange(int(is_mlm.sum())), masked["masked_positions"].shape[1])
            hit = masked["masked_weights"].ravel() > 0
            mlm_mask[rows_K[hit], masked["masked_positions"].ravel()[hit]] = 1.0
            targets[is_mlm], loss_mask[is_mlm] = mlm_targets, mlm_mask
        return {
            "inputs": inputs,
            "targets": targets,
            "positions": packed["positions"],
            "segment_ids": packed["segment_ids"],
            "loss_mask": loss_mask,
            "prefix_len": prefix[:, None].astype(np.int32),
            "objective_ids": objective[:, None],
        }

    def batch(
        self, step: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``step``: global rows from ``ramp.offset(step)``
        on, ``ramp.size(step)`` of them (``step * B + row`` without a ramp)."""
        return self.build(ramp_rows(self.ramp, step, process_index, process_count))

    def eval_batches(
        self,
        batch_size: int,
        max_batches: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Walks the split in order (use ``shuffle=False``), ``batch_size`` examples at a time;
        the last batch is padded with rows whose weights and loss masks are 0."""
        return padded_eval_batches(
            self.build, self.n_examples, batch_size, max_batches, process_index, process_count
        )


def make_masked_batches(
    split: TokenSplit,
    cfg: Config,
    tokenizer: Tokenizer,
    global_batch: int,
    seed: int | None = None,
    shuffle: bool = True,
    ramp: BatchRamp | None = None,
) -> MaskedBatches:
    """MaskedBatches for ``cfg`` (layout, shares and masking from ``cfg.objective``);
    ``ramp``: the batch size of each data position (``train.batch_ramp``)."""
    ob = cfg.objective
    spec = MaskingSpec.from_tokenizer(tokenizer, ob, cfg.data.seq_len)
    return MaskedBatches(
        split,
        layout_of(cfg),
        cfg.data.seq_len,
        global_batch,
        cfg.train.seed if seed is None else seed,
        spec,
        tokenizer,
        (ob.mlm, ob.causal, ob.prefix_lm),
        shuffle,
        ramp,
    )
