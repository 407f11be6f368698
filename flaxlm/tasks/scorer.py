"""Scoring requests with a flaxlm model: the one path ``flaxlm eval --tasks`` and the
lm-evaluation-harness adapter (``flaxlm lm-eval --model flaxlm``) both call.

    scorer = Scorer(load_checkpoint("runs/gpt_demo"))
    scorer.loglikelihood([("The cat sat on the", " mat")])   # [(log p, is_greedy)]
    scorer.loglikelihood_rolling(["a whole document"])       # [log p of every token]
    scorer.generate_until([("Q: 2+2\\nA:", ["\\n"], 16)])      # ["greedy text"]

Tokenisation follows the harness's ``TemplateLM`` exactly, so context/continuation boundaries
match its reference HF model: trailing spaces of the context move to the continuation; the
continuation's tokens are those of ``encode(context + continuation)`` past
``len(encode(context))``; an empty context is the ``<s>`` token; inputs longer than the
model's window keep their last ``max_length`` tokens. Rolling log-likelihood uses the
harness's disjoint windows (every token predicted once, the first from ``<s>``).

Rows are sorted by length, cut into batches of ``batch_size`` (a multiple of the mesh's batch
shards, padded with empty rows) and right-padded to a multiple of ``BUCKET`` tokens, so a
task compiles a handful of programs. Batches are sharded over (data, fsdp) like training and
the sums come back replicated. The family decides how a row is scored
(:class:`flaxlm.families.TaskScoring`): a decoder in one causal pass; an encoder by
pseudo-log-likelihood, one row per continuation token with that token masked; an
encoder-decoder with the context as its encoder input and the continuation as the decoder's
target (flaxlm/tasks/seq2seq.py: its tokenisation, rows and generation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxlm.families import family_of
from flaxlm.parallel.sharding import BATCH_AXES, LOGICAL_RULES, batch_sharding, replicated
from flaxlm.tasks.generation import BUCKET, TOKEN_SEGMENT, greedy_generate
from flaxlm.tasks.seq2seq import pad_seq2seq_rows, seq2seq_generate, seq2seq_pair, seq2seq_row
from flaxlm.tasks.spec import TaskError


class Scorer:
    """Scores requests with ``loaded`` (anything with ``cfg``, ``model``, ``params``,
    ``tokenizer``, ``mesh``: a :class:`~flaxlm.tools.load.LoadedModel`, or the trainer's
    state). ``batch_size`` rows per call (0: the run's micro-batch); ``max_length`` the
    window (0: ``model.max_seq_len``, what the HF export declares as ``n_positions``)."""

    def __init__(self, loaded: Any, batch_size: int = 0, max_length: int = 0):
        cfg = loaded.cfg
        self.loaded, self.tokenizer, self.mesh = loaded, loaded.tokenizer, loaded.mesh
        self.family = family_of(cfg)
        self.scoring = self.family.task_scoring
        if self.scoring is None:
            raise TaskError(
                f"model.family={cfg.model.family!r} cannot score tasks (no task_scoring)"
            )
        self.max_length = max_length or cfg.model.max_seq_len
        shards = math.prod(self.mesh.shape[a] for a in BATCH_AXES)
        batch_size = batch_size or cfg.train.batch_size // cfg.train.grad_accum
        self.batch_size = -(-batch_size // shards) * shards
        # The harness's prefix_token_id: BOS, else EOS (T5's tokenizer has no BOS).
        self.seq2seq = self.scoring.kind == "seq2seq"
        self.prefix_id = self.tokenizer.eos_id if self.seq2seq else self.tokenizer.bos_id
        self._score = self._jit_score()

    def supports(self, request_type: str) -> bool:
        return request_type in self.scoring.requests

    def require(self, request_type: str, task: str = "") -> None:
        """One line naming the family and what it can run, unless it runs ``request_type``."""
        if not self.supports(request_type):
            what = f"task {task!r} needs" if task else "needs"
            raise TaskError(
                f"{what} {request_type} requests; model.family={self.family.name!r} scores "
                f"only {', '.join(self.scoring.requests)} ({self.scoring.kind})"
            )

    # --- tokenisation (lm_eval.api.model.TemplateLM) ----------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if self.seq2seq:  # encoder input and target, each encoded on its own
            return seq2seq_pair(self.tokenizer, context, continuation)
        encode = self.tokenizer.encode
        if context == "":
            cont = encode(continuation)
            if cont and cont[0] == self.prefix_id:
                return cont[:1], cont[1:]
            return [self.prefix_id], cont
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = encode(context + continuation), encode(context)
        return ctx, whole[len(ctx) :]

    # --- requests ---------------------------------------------------------------------------

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` per ``(context, continuation)``."""
        self.require("loglikelihood")
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """The log-likelihood of each whole text over the harness's disjoint windows."""
        self.require("loglikelihood_rolling")
        windows, owner = [], []
        for i, text in enumerate(texts):
            for window in rolling_windows(
                self.tokenizer.encode(text), self.prefix_id, self.max_length
            ):
                windows.append(window)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, self.loglikelihood_tokens(windows), strict=True):
            totals[i] += ll
        return totals

    def generate_until(self, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]:
        """Greedy text after each context, cut at the first stop string (``</s>`` stops too)."""
        self.require("generate_until")
        if self.seq2seq:
            return seq2seq_generate(self, requests)
        return greedy_generate(self, requests)

    def loglikelihood_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]]
    ) -> list[tuple[float, bool]]:
        """Scores token pairs ``(context, continuation)`` (context non-empty)."""
        rows, owner = self._rows(pairs)
        sums = np.zeros(len(pairs))
        greedy = np.ones(len(pairs), bool)
        order = sorted(range(len(rows)), key=lambda r: -max(map(len, rows[r].values())))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            ll, ok = self._run([rows[r] for r in chunk])
            for r, value, good in zip(chunk, ll, ok, strict=False):
                sums[owner[r]] += value
                greedy[owner[r]] &= bool(good)
        return [(float(s), bool(g)) for s, g in zip(sums, greedy, strict=True)]

    # --- rows and batches -------------------------------------------------------------------

    def _rows(self, pairs) -> tuple[list[dict[str, np.ndarray]], list[int]]:
        rows, owner = [], []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise TaskError("a continuation encoded to no tokens")
            if self.scoring.kind == "causal":
                rows.append(causal_row(ctx, cont, self.max_length))
                owner.append(i)
            elif self.scoring.kind == "masked":
                made = masked_rows(ctx, cont, self.max_length, self.tokenizer)
                rows += made
                owner += [i] * len(made)
            elif self.seq2seq:
                rows.append(seq2seq_row(ctx, cont, self.max_length, self.tokenizer.pad_id))
                owner.append(i)
            else:
                raise TaskError(
                    f"task scoring kind {self.scoring.kind!r} has no request layout yet"
                )
        return rows, owner

    def _run(self, rows: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        if self.seq2seq:
            batch = pad_seq2seq_rows(rows, self.batch_size, self.max_length)
        else:
            longest = max(len(r["tokens"]) for r in rows)
            width = min(-(-longest // BUCKET) * BUCKET, self.max_length)
            batch = pad_rows(rows, self.batch_size, width)
        sharding = batch_sharding(self.mesh)
        on_mesh = {
            k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()
        }
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            ll, ok = jax.device_get(self._score(self.loaded.params, on_mesh))
        return ll[: len(rows)], ok[: len(rows)]

    def _jit_score(self) -> Callable:
        token_log_probs, model = self.scoring.token_log_probs, self.loaded.model

        def score(params, batch):
            mask = batch.pop("score_mask")
            log_p, greedy = token_log_probs(model, params, batch)
            total = jnp.sum(jnp.where(mask > 0, log_p, 0.0), axis=-1)
            return total, jnp.all(greedy | (mask == 0), axis=-1)

        return jax.jit(score, out_shardings=replicated(self.mesh))


def causal_row(ctx: list[int], cont: list[int], max_length: int) -> dict[str, np.ndarray]:
    """The harness's row: ``(ctx + cont)[-(max_length + 1):]`` shifted by one, scoring the
    last ``len(cont)`` targets."""
    whole = (list(ctx) + list(cont))[-(max_length + 1) :]
    n = len(whole) - 1
    score = np.zeros(n, np.int32)
    score[n - min(len(cont), n) :] = 1
    return {
        "tokens": np.asarray(whole[:-1], np.int32),
        "targets": np.asarray(whole[1:], np.int32),
        "positions": np.arange(n, dtype=np.int32),
        "segment_ids": np.full(n, TOKEN_SEGMENT, np.int32),
        "score_mask": score,
    }


def masked_rows(ctx: list[int], cont: list[int], max_length: int, tok) -> list[dict]:
    """Pseudo-log-likelihood rows: ``[CLS] ctx cont [SEP]`` (the context cut from the left to
    fit), one row per continuation token with that token replaced by ``[MASK]``."""
    if tok.cls_id is None or tok.sep_id is None or tok.mask_id is None:
        raise TaskError("pseudo-log-likelihood needs a tokenizer with [CLS], [SEP] and [MASK]")
    keep = max(0, max_length - 2 - len(cont))
    cont = list(cont)[-(max_length - 2) :]
    tokens = np.asarray(
        [tok.cls_id, *list(ctx)[max(0, len(ctx) - keep) :], *cont, tok.sep_id], np.int32
    )
    n, first = len(tokens), len(tokens) - 1 - len(cont)
    rows = []
    for j in range(len(cont)):
        masked = tokens.copy()
        masked[first + j] = tok.mask_id
        rows.append({
            "tokens": masked,
            "positions": np.arange(n, dtype=np.int32),
            "segment_ids": np.full(n, TOKEN_SEGMENT, np.int32),
            "token_types": np.zeros(n, np.int32),
            "masked_positions": np.asarray([first + j], np.int32),
            "targets": np.asarray([cont[j]], np.int32),
            "score_mask": np.ones(1, np.int32),
        })  # fmt: skip
    return rows


def pad_rows(rows: list[dict[str, np.ndarray]], batch: int, width: int) -> dict[str, np.ndarray]:
    """Stacks rows into ``(batch, ...)`` arrays: full-length keys right-padded to ``width``
    (padding: token 0, segment 0, not scored), fixed-size keys as they are; missing rows are
    all padding."""
    length = len(rows[0]["tokens"])
    out = {}
    for key in rows[0]:
        fixed = len(rows[0][key]) != length  # (B, 1) keys of masked rows (>= 3 tokens)
        size = len(rows[0][key]) if fixed else width
        arr = np.zeros((batch, size), np.int32)
        for i, row in enumerate(rows):
            arr[i, : len(row[key])] = row[key]
        out[key] = arr
    return out


def rolling_windows(
    tokens: list[int], prefix_id: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """The harness's ``get_rolling_token_windows(context_len=1)`` made disjoint: ``(context,
    continuation)`` pairs that predict every token once, each with up to ``max_length`` tokens
    of input; the first window starts from ``prefix_id``."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_id], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        inputs = tokens[end - max_length - 1 : end - 1]  # end > max_length here
        windows.append((inputs[: len(inputs) - (n - 1)], tokens[end - n : end]))
        done = end
    return windows
