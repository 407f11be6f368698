"""Weighted mixtures of sources, still a pure function of (seed, step).

Rows are dealt in blocks of R = global_batch * P rows (P steps, R >= 4096). Within a block,
source s gets exactly ``n_s`` rows, the largest-remainder apportionment of ``R * w_s``, so
every source's share is exact to 1/R at each block boundary; which rows of the block are
whose is a permutation drawn from ``default_rng([seed, MIX_STREAM, block])``. The j-th row that
source s ever gets (``j = block * n_s + rank within the block``) is that source's example
``perm_{s,e}[j mod N_s]`` of its own epoch ``e = j div N_s``, exactly as
:class:`~flaxlm.data.causal_batches.CausalBatches` walks one source; a small source is repeated
(more epochs) and a large one is visited once at most per its epoch. Jumping to any step costs
one permutation of R rows; each process builds only its own rows.

Stages (``data.stages``, e.g. an annealing stage): from data position ``step`` on the weights
change. Stage ``i`` covers the global rows from ``ramp.offset(step_i)`` (flaxlm/data/batch_ramp.py)
to the next stage's first row, dealt in its own blocks (from its first row; permutations from
``default_rng([seed, MIX_STREAM, i, block])``, stage 0 as above); its last block, cut short
by the next stage, is apportioned exactly over the rows it has. Each source's row counter
continues across a boundary: in stage ``i``, ``j = before_{i,s} + block * n_{i,s} + rank``,
where ``before_{i,s}`` (the rows s got in earlier stages) is a closed-form sum over the stages.
So the j-th row a source ever gets is the same example whatever the stages, any step is still
one permutation away, and a run with no stages deals exactly the rows it always did.

    batches = MixtureBatches(prepared.sources, seq_len=256, global_batch=32, seed=0)
    batch = batches.batch(step, jax.process_index(), jax.process_count())
    batch["source_ids"]  # (32 // process_count, 256) int32: the source of each row's tokens
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.cache import PreparedData, SourceData
from flaxlm.data.causal_batches import BATCH_KEYS, CausalBatches, pack_examples, ramp_rows

MIXTURE_BATCH_KEYS = (*BATCH_KEYS, "source_ids")
MIN_BLOCK_ROWS = 4096
MIX_STREAM = 0x6D6978  # separates the block permutations from every other seeded stream


def apportion(weights: Sequence[float], rows: int) -> np.ndarray:
    """(S,) int64 rows per source summing to ``rows``: largest remainder of ``rows * w``.

    Ties go to the lower index, so the result is the same everywhere.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not (w > 0).all():
        raise ValueError(f"weights {list(weights)} must be a non-empty list of positive numbers")
    exact = rows * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    short = rows - int(counts.sum())
    order = np.lexsort((np.arange(len(w)), -(exact - counts)))  # largest remainder first
    counts[order[:short]] += 1
    return counts


def apportion_some(weights: Sequence[float], rows: int) -> np.ndarray:
    """:func:`apportion` where zero weights (a source a stage leaves out) get no rows."""
    w = np.asarray(weights, dtype=np.float64)
    counts = np.zeros(len(w), dtype=np.int64)
    counts[w > 0] = apportion(w[w > 0], rows)
    return counts


def source_seed(seed: int, name: str) -> int:
    """A per-source seed, stable under adding, removing or reordering other sources."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class MixStage:
    """One stage of a mixture: global rows ``[first_row, end_row)`` (None: no end)."""

    index: int
    position: int  # the data position it starts at
    first_row: int
    end_row: int | None
    weights: np.ndarray  # (S,) normalised; 0 = the source gets no rows in this stage
    block_rows: int
    rows_per_block: np.ndarray  # (S,) of a full block
    before: np.ndarray  # (S,) rows each source got in the earlier stages

    def rows_given(self, rows: int) -> np.ndarray:
        """(S,) rows each source gets in the stage's first ``rows`` rows (whole blocks only
        are exact; inside a block, the block's share)."""
        full, part = divmod(rows, self.block_rows)
        return full * self.rows_per_block + part * self.rows_per_block / self.block_rows


class MixtureBatches:
    """Step-indexed batches drawn from several sources by weight.

    Same interface as CausalBatches (``batch(step, process_index, process_count)``), plus a
    ``source_ids`` key (the index of each row's source, per token, so it shards like the other
    keys) unless ``emit_source_ids=False``. ``ramp``: the batch size of each data position
    (``train.batch_ramp``); ``stages``: ``[(data position, (S,) weights), ...]`` after which
    the weights change (``data.stages``; the sources' own weights hold before the first).
    """

    def __init__(
        self,
        sources: Sequence[SourceData],
        seq_len: int,
        global_batch: int,
        seed: int,
        emit_source_ids: bool = True,
        ramp: BatchRamp | None = None,
        stages: Sequence[tuple[int, Sequence[float]]] = (),
    ):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        self.names = [s.name for s in sources]
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.emit_source_ids = emit_source_ids
        self.ramp = BatchRamp.or_constant(ramp, global_batch)  # train.batch_ramp
        self.stages = self._build_stages([s.weight for s in sources], stages)
        first = self.stages[0]
        self.weights, self.block_rows = first.weights, first.block_rows
        self.block_steps = first.block_rows // global_batch
        self.rows_per_block = first.rows_per_block
        self._first_rows = np.array([st.first_row for st in self.stages], dtype=np.int64)
        self.per_source = []
        for s in sources:
            try:
                batches = CausalBatches(s.train, seq_len, 1, source_seed(seed, s.name))
            except ValueError as e:
                raise ValueError(f"source {s.name!r}: {e}") from None
            self.per_source.append(batches)
        self._blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _build_stages(
        self, base: Sequence[float], later: Sequence[tuple[int, Sequence[float]]]
    ) -> list[MixStage]:
        plan = [(0, base), *later]
        out: list[MixStage] = []
        before = np.zeros(len(base), dtype=np.int64)
        for i, (position, weights) in enumerate(plan):
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(base),) or (w < 0).any() or not w.sum() > 0:
                raise ValueError(
                    f"stage {i} weights {list(weights)} must be {len(base)} numbers >= 0, not all 0"
                )
            if i and position <= plan[i - 1][0]:
                raise ValueError(f"stage steps {[p for p, _ in plan[1:]]} must increase from 1")
            w = w / w.sum()
            # Enough steps per block that the smallest weight still gets a few rows per block.
            min_rows = max(MIN_BLOCK_ROWS, math.ceil(20 / w[w > 0].min()))
            block_rows = -(-min_rows // self.global_batch) * self.global_batch
            first_row = self.ramp.offset(position)
            end_row = self.ramp.offset(plan[i + 1][0]) if i + 1 < len(plan) else None
            stage = MixStage(
                i, position, first_row, end_row, w, block_rows,
                apportion_some(w, block_rows), before.copy(),
            )  # fmt: skip
            out.append(stage)
            if end_row is not None:
                full, part = divmod(end_row - first_row, block_rows)
                before = before + full * stage.rows_per_block
                if part:
                    before = before + apportion_some(w, part)
        return out

    @property
    def shares(self) -> np.ndarray:
        """(S,) each source's exact share of the rows of a block (of the first stage)."""
        return self.rows_per_block / self.block_rows

    def block(self, index: int, stage: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(R,) source of each row of block ``index`` of ``stage``, (R,) that row's index
        within its source (R is shorter for a stage's last block, cut by the next stage)."""
        cached = self._blocks.get((stage, index))
        if cached is not None:
            return cached
        st = self.stages[stage]
        R = st.block_rows
        counts = st.rows_per_block
        if st.end_row is not None and (index + 1) * R > st.end_row - st.first_row:
            R = st.end_row - st.first_row - index * R
            counts = apportion_some(st.weights, R)
        labels = np.repeat(np.arange(len(self.names)), counts)
        stream = (
            [self.seed, MIX_STREAM, index] if stage == 0 else [self.seed, MIX_STREAM, stage, index]
        )
        source_R = labels[np.random.default_rng(stream).permutation(R)]
        # Rank of each row among its source's rows in the block, in row order.
        order = np.argsort(source_R, kind="stable")
        firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank_R = np.empty(R, dtype=np.int64)
        rank_R[order] = np.arange(R) - np.repeat(firsts, counts)
        within_R = st.before[source_R] + index * st.rows_per_block[source_R] + rank_R
        self._blocks = {k: v for k, v in self._blocks.items() if k >= (stage, index - 1)}
        self._blocks[(stage, index)] = (source_R, within_R)
        return source_R, within_R

    def row_sources(self, global_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global row indices: (source index, row index within source)."""
        global_rows = np.asarray(global_rows, dtype=np.int64)
        stage_of = np.searchsorted(self._first_rows, global_rows, side="right") - 1
        source, within = np.empty_like(global_rows), np.empty_like(global_rows)
        for i in np.unique(stage_of):
            st = self.stages[int(i)]
            in_stage = stage_of == i
            block, offset = np.divmod(global_rows - st.first_row, st.block_rows)
            for b in np.unique(block[in_stage]):
                sel = in_stage & (block == b)
                source_R, within_R = self.block(int(b), int(i))
                source[sel], within[sel] = source_R[offset[sel]], within_R[offset[sel]]
        return source, within

    def batch(
        self, step: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``step``: each array (B / P, S), with
        ``B = ramp.size(step)``."""
        rows = ramp_rows(self.ramp, step, process_index, process_count)
        source, within = self.row_sources(rows)
        S = self.seq_len
        out = {k: np.zeros((len(rows), S), np.float32 if k == "loss_mask" else np.int32)
               for k in BATCH_KEYS}  # fmt: skip
        for s in np.unique(source):
            sel = source == s
            src = self.per_source[s]
            packed = pack_examples(
                src.split.tokens, src.split.doc_offsets, src.example_ids(within[sel]), S
            )
            for key in BATCH_KEYS:
                out[key][sel] = packed[key]
        if self.emit_source_ids:
            out["source_ids"] = np.repeat(source.astype(np.int32)[:, None], S, axis=1)
        return out

    def stage_at(self, step: int) -> MixStage:
        """The stage data position ``step`` belongs to."""
        return self.stages[
            int(np.searchsorted(self._first_rows, self.ramp.offset(step), "right")) - 1
        ]

    def rows_before(self, step: int) -> np.ndarray:
        """(S,) rows each source gets in the batches before data position ``step`` (exact
        at block and stage boundaries; inside a block, the block's share)."""
        st = self.stage_at(step)
        return st.before + st.rows_given(self.ramp.offset(step) - st.first_row)

    def epochs_at(self, step: int) -> np.ndarray:
        """(S,) how many epochs of each source the first ``step`` steps consume."""
        return self.rows_before(step) / np.array([b.n_examples for b in self.per_source])


def stage_weights(names: Sequence[str], weights: Mapping[str, float]) -> list[float]:
    """A stage's ``{source name: weight}`` as a list in source order (unnamed sources: 0)."""
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"data.stages names source {unknown[0]!r}, not one of {', '.join(names)}")
    return [float(weights.get(n, 0.0)) for n in names]


def make_train_batches(
    prepared: PreparedData,
    seq_len: int,
    global_batch: int,
    seed: int,
    ramp: BatchRamp | None = None,
    stages: Sequence[Any] = (),
) -> CausalBatches | MixtureBatches:
    """The training batches a config asks for: one source -> CausalBatches (unchanged
    behaviour), several -> MixtureBatches (with ``source_ids``). ``ramp``: the batch size of
    each data position (``train.batch_ramp``); ``stages``: ``data.stages`` entries (``.step``,
    ``.weights`` by source name)."""
    if len(prepared.sources) <= 1 and not stages:
        return CausalBatches(prepared.train, seq_len, global_batch, seed, ramp=ramp)
    names = [s.name for s in prepared.sources]
    plan = [(st.step, stage_weights(names, st.weights)) for st in stages]
    return MixtureBatches(prepared.sources, seq_len, global_batch, seed, ramp=ramp, stages=plan)
