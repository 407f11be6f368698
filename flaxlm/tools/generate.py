"""``flaxlm generate``: text from a checkpoint with a KV cache — greedy, sampling, beam search.

    from flaxlm.tools.load import load_checkpoint
    from flaxlm.tools.generate import GenerateOptions, generate

    loaded = load_checkpoint("runs/gpt_demo")
    generate(loaded, "HAMLET", GenerateOptions(max_new_tokens=50, temperature=0.8, top_p=0.9))
    generate(loaded, ["ROMEO", "KING LEAR. Attend"], GenerateOptions(num_beams=4))

How it runs: prompts of different lengths are left-padded into one batch (padding has segment
id 0 and never is attended to; positions count real tokens only). One *prefill* call runs the
padded prompts through the model and fills the cache; the decoding loop (``lax.while_loop``)
then feeds one token per row per step. Prefill and loop are one jitted function, compiled once
per (batch, padded prompt length, options): prompt lengths are padded up to a multiple of
``PROMPT_BUCKET`` so nearby lengths share it, and no token ever recompiles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxlm.families import family_of
from flaxlm.tools import beam, sampling
from flaxlm.tools.load import LoadedModel
from flaxlm.tools.sampling import SamplingOptions

PROMPT_BUCKET = 32
PAD_SEGMENT, TOKEN_SEGMENT = 0, 1


@dataclass(frozen=True)
class GenerateOptions:
    """Decoding options (hashable: they select the compiled program).

    ``temperature=0`` is greedy; ``top_k`` / ``top_p`` filter the sampled distribution
    (0 / 1 = off); ``num_beams > 1`` is beam search with GNMT ``length_penalty`` alpha (the
    sampling options are then unused). Rows end at ``</s>`` unless ``stop_at_eos=False``.
    """

    max_new_tokens: int = 100
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 0.6
    stop_at_eos: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.num_beams < 1:
            raise ValueError(f"num_beams={self.num_beams} must be >= 1")
        SamplingOptions(self.temperature, self.top_k, self.top_p)  # validates them

    @property
    def sampling(self) -> SamplingOptions:
        return SamplingOptions(self.temperature, self.top_k, self.top_p)


# --- the KV cache ---------------------------------------------------------------------------


def init_cache(model: nn.Module, batch: int, length: int) -> Any:
    """A zero KV cache for ``batch`` rows of up to ``length`` tokens (the "cache" collection
    of ``model.apply(..., decode=True)``): per layer ``cached_key``/``cached_value``
    ``(B, S, H, K)``, plus the write ``index`` and the ``segment_ids`` ``(B, S)`` of the cached
    tokens."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    shapes = jax.eval_shape(partial(model.init, decode=True), jax.random.key(0), tokens)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def decode_step(
    model: nn.Module,
    params: Any,
    cache: Any,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """Appends T tokens per row to the cache. Returns ``(logits_BxTxV, cache)``.

    Prefill is a call with the whole padded prompt; decoding, calls with T = 1.
    """
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.full(tokens_BxT.shape, TOKEN_SEGMENT, jnp.int32)
    logits_BxTxV, variables = model.apply(
        {"params": params, "cache": cache},
        tokens_BxT,
        positions_BxT,
        segment_ids_BxT,
        decode=True,
        mutable=["cache"],
    )
    return logits_BxTxV, variables["cache"]


# --- prompts --------------------------------------------------------------------------------


@dataclass
class PaddedPrompts:
    """Left-padded prompts: ``tokens_BxP``, ``positions_BxP`` (0 at each row's first real
    token), ``segment_ids_BxP`` (0 = padding) and ``lengths_B``."""

    tokens_BxP: np.ndarray
    positions_BxP: np.ndarray
    segment_ids_BxP: np.ndarray
    lengths_B: np.ndarray


def pad_prompts(
    prompts: list[list[int]], pad_id: int, bucket: int = PROMPT_BUCKET
) -> PaddedPrompts:
    """Left-pads token lists to a common length, a multiple of ``bucket``."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if not len(prompts) or lengths.min() == 0:
        raise ValueError("every prompt needs at least one token")
    width = -(-int(lengths.max()) // bucket) * bucket
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.zeros((len(prompts), width), np.int32)
    segments = np.full((len(prompts), width), PAD_SEGMENT, np.int32)
    for row, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
        tokens[row, width - n :] = prompt
        positions[row, width - n :] = np.arange(n)
        segments[row, width - n :] = TOKEN_SEGMENT
    return PaddedPrompts(tokens, positions, segments, lengths)


# --- generation -----------------------------------------------------------------------------


@dataclass
class Generation:
    """Per prompt: the new token ids (without the final ``</s>``) and, for beam search, the
    length-penalised log-probability of the returned hypothesis."""

    ids: list[list[int]]
    scores: list[float] | None = None


def generate_ids(
    model: nn.Module,
    params: Any,
    prompts: list[list[int]],
    opts: GenerateOptions,
    eos_id: int | None,
    pad_id: int = 0,
    context: int | None = None,
    use_cache: bool = True,
) -> Generation:
    """Continues each token list in ``prompts`` (a batch; lengths may differ).

    Args: ``eos_id`` the token that ends a row (not returned; None = never); ``context`` how
    many tokens the model sees (default ``max_seq_len``; a checkpoint's is the ``seq_len`` it
    was trained on). ``use_cache=False`` re-runs the whole window for every token (slow; the
    reference the cache is tested and timed against).

    Sampling goes past the context: the KV cache serves until prompt + output fill it, then
    each further token re-runs the last ``context`` tokens (a sliding window, as there is no
    way to shift absolute positions inside a cache). Beam search needs
    ``max_new_tokens < context``. Prompts keep their last tokens when too long.
    """
    context = context or model.cfg.max_seq_len
    n = opts.max_new_tokens
    beams = opts.num_beams > 1
    if beams and n >= context:
        raise ValueError(
            f"beam search: max_new_tokens={n} must be below the model's context {context}"
        )
    keep = context - n if beams else context
    padded = pad_prompts([list(p)[-keep:] for p in prompts], pad_id)
    stop = eos_id if opts.stop_at_eos else None
    args = (
        jnp.asarray(padded.tokens_BxP),
        jnp.asarray(padded.positions_BxP),
        jnp.asarray(padded.segment_ids_BxP),
        jnp.asarray(padded.lengths_B),
    )
    static = {"opts": opts, "eos_id": stop, "pad_id": pad_id}
    scores = None
    if beams:
        result = _beam_generate(model, params, *args, **static)
        tokens = jax.device_get(result.tokens_BxWxN[:, 0])
        scores = [float(s) for s in jax.device_get(result.scores_BxW[:, 0])]
    else:
        # Tokens decoded with the cache: until the longest prompt fills the context.
        cached = max(0, min(n, context - int(padded.lengths_B.max()))) if use_cache else 0
        # The seed is traced, not static: a new seed must not recompile.
        static["opts"] = dataclasses.replace(opts, seed=0)
        seed = jnp.asarray(opts.seed, jnp.uint32)
        tokens = jax.device_get(
            _sample_generate(model, params, *args, seed, **static, context=context, cached=cached)
        )
    ids = []
    for row in tokens.tolist():
        if stop is not None and stop in row:
            row = row[: row.index(stop)]
        ids.append(row)
    return Generation(ids, scores)


def _prefill(model, params, tokens_BxP, positions_BxP, segments_BxP, n: int, copies: int = 1):
    """Runs the prompts into a fresh cache of ``P + n`` slots. Returns (logits after each
    prompt ``BxV``, cache); ``copies > 1`` repeats each row's cache (row b -> b*W + w)."""
    batch, width = tokens_BxP.shape
    cache = init_cache(model, batch, width + n)
    logits_BxPxV, cache = decode_step(model, params, cache, tokens_BxP, positions_BxP, segments_BxP)
    if copies > 1:
        cache = jax.tree.map(lambda x: jnp.repeat(x, copies, axis=0) if x.ndim else x, cache)
    # Left padding puts every prompt's last token in the last column.
    return logits_BxPxV[:, -1], cache


def _cached_step(model, params):
    def step(cache, token_Bx1, position_Bx1):
        logits_Bx1xV, cache = decode_step(model, params, cache, token_Bx1, position_Bx1)
        return logits_Bx1xV[:, 0], cache

    return step


def _window_step(model, params):
    """The no-cache step: state ``(window_BxC, count_B)`` holds each row's last C tokens,
    right-aligned; the model re-reads the whole window, positions from 0 at its first token."""

    def logits_of(window_BxC, count_B):
        width = window_BxC.shape[1]
        first_B = width - count_B
        columns_C = jnp.arange(width)
        segments_BxC = (columns_C[None, :] >= first_B[:, None]).astype(jnp.int32)
        positions_BxC = jnp.maximum(columns_C[None, :] - first_B[:, None], 0)
        return model.apply({"params": params}, window_BxC, positions_BxC, segments_BxC)[:, -1]

    def step(state, token_Bx1, _position_Bx1):
        window_BxC, count_B = state
        window_BxC = jnp.concatenate([window_BxC[:, 1:], token_Bx1], axis=1)
        count_B = jnp.minimum(count_B + 1, window_BxC.shape[1])
        return logits_of(window_BxC, count_B), (window_BxC, count_B)

    return step, logits_of


@partial(jax.jit, static_argnames=("model", "opts", "eos_id", "pad_id", "context", "cached"))
def _sample_generate(
    model, params, tokens, positions, segments, lengths, seed, opts, eos_id, pad_id, context, cached
):
    """``cached`` tokens through the KV cache, the rest through the sliding window."""
    rng = jax.random.key(seed)
    batch = tokens.shape[0]
    done_B = jnp.zeros((batch,), jnp.bool_)
    outputs = []
    if cached:
        logits_BxV, cache = _prefill(model, params, tokens, positions, segments, cached)
        step = _cached_step(model, params)
        out_BxN, done_B = sampling.sample_loop(
            step, logits_BxV, cache, lengths, opts.sampling, cached, eos_id, pad_id, rng
        )
        outputs.append(out_BxN)
    rest = opts.max_new_tokens - cached
    if rest:
        # Each row's tokens so far are contiguous at the end of prompt ++ output.
        history = jnp.concatenate([tokens, *outputs], axis=1)
        if history.shape[1] < context:
            history = jnp.pad(history, ((0, 0), (context - history.shape[1], 0)))
        window_BxC = history[:, -context:]
        count_B = jnp.minimum(lengths + cached, context)
        step, logits_of = _window_step(model, params)
        out_BxN, _ = sampling.sample_loop(
            step,
            logits_of(window_BxC, count_B),
            (window_BxC, count_B),
            lengths + cached,
            opts.sampling,
            rest,
            eos_id,
            pad_id,
            rng,
            done_B,
            first_step=cached,
        )
        outputs.append(out_BxN)
    return jnp.concatenate(outputs, axis=1)


@partial(jax.jit, static_argnames=("model", "opts", "eos_id", "pad_id"))
def _beam_generate(model, params, tokens, positions, segments, lengths, opts, eos_id, pad_id):
    n, w = opts.max_new_tokens, opts.num_beams
    logits_BxV, cache = _prefill(model, params, tokens, positions, segments, n, copies=w)
    step = _cached_step(model, params)
    return beam.beam_search(
        step, logits_BxV, cache, lengths, w, n, eos_id, pad_id, opts.length_penalty
    )


def generate(
    loaded: LoadedModel, prompts: str | list[str], opts: GenerateOptions | None = None, **kw
) -> str | list[str]:
    """The continuation of each prompt as text (a str for a str). Options come as a
    :class:`GenerateOptions` or as its fields: ``generate(loaded, "To be", temperature=0.8)``.

    An empty prompt starts a new document (the model saw ``</s>`` before every document). The
    context is the ``seq_len`` the checkpoint was trained on.
    """
    opts = dataclasses.replace(opts or GenerateOptions(), **kw)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    out = generate_for(loaded, [loaded.tokenizer.encode(t) for t in texts], opts)
    decode = loaded.tokenizer.decode
    if family_of(loaded.cfg).encoder_decoder:  # sentinel ids read <extra_id_i>
        from flaxlm.tools.seq2seq_generate import text_decoder

        decode = text_decoder(loaded)
    decoded = [decode(row) for row in out.ids]
    return decoded[0] if isinstance(prompts, str) else decoded


def generate_for(
    loaded: LoadedModel, prompts: list[list[int]], opts: GenerateOptions
) -> Generation:
    """:func:`generate_ids` with a checkpoint's model, tokenizer ids and trained context;
    an empty prompt becomes ``[</s>]``."""
    if not family_of(loaded.cfg).generates:
        raise ValueError(
            f"generation needs a decoder: model.family={loaded.cfg.model.family!r} is not one"
        )
    tok = loaded.tokenizer
    context = min(loaded.cfg.data.seq_len, loaded.cfg.model.max_seq_len)
    if family_of(loaded.cfg).encoder_decoder:  # the prompt is the encoder input
        from flaxlm.tools.seq2seq_generate import generate_seq2seq_ids

        args = (loaded.model, loaded.params, prompts, opts, tok.eos_id, tok.pad_id, context)
        return Generation(*generate_seq2seq_ids(*args))
    prompts = [list(p) or [tok.eos_id] for p in prompts]
    return generate_ids(
        loaded.model, loaded.params, prompts, opts, tok.eos_id, tok.pad_id, context=context
    )
