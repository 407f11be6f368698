"""``flaxlm sample``: the single-prompt interface of :mod:`flaxlm.tools.generate`, kept for
``make demo`` and existing callers. Prefer ``flaxlm generate`` / ``generate.generate``."""

from __future__ import annotations

from flaxlm.tools.generate import GenerateOptions, generate_for
from flaxlm.tools.load import LoadedModel


def generate_ids(
    loaded: LoadedModel,
    prompt_ids: list[int],
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[int]:
    """Continues ``prompt_ids``; ``temperature=0`` is greedy. Returns only the new ids."""
    opts = GenerateOptions(
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop_at_eos=stop_at_eos
    )
    return generate_for(loaded, [prompt_ids], opts).ids[0]


def generate(
    loaded: LoadedModel,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """The prompt's continuation as text."""
    ids = generate_ids(loaded, loaded.tokenizer.encode(prompt), max_new_tokens, temperature, seed)
    return loaded.tokenizer.decode(ids)
