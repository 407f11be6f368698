"""What a run trains on: the tokenizer and the train / val splits, whole and per source.

:func:`flaxlm.data.prepare_data` returns a :class:`PreparedData`, built from the tokenize-once
cache (flaxlm/data/cache.py) or opened from a prepared corpus (flaxlm/data/prepared_reader.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flaxlm.data.token_split import TokenSplit
from flaxlm.tokenizers.sentencepiece import Tokenizer

SPLITS = ("train", "val")


@dataclass
class SourceData:
    """One source's share of the prepared data: its documents in each split, and its weight."""

    name: str
    weight: float  # normalised: the weights of all sources sum to 1
    train: TokenSplit
    val: TokenSplit
    n_empty_docs: int = 0


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: TokenSplit  # every source's documents, in source order
    val: TokenSplit
    cache_dir: Path
    cache_hit: bool  # True when the cache existed and nothing was tokenized
    n_empty_docs: int  # empty / whitespace-only documents skipped
    seconds: float  # wall time of prepare_data
    sources: list[SourceData] = field(default_factory=list)  # in data.sources order
    # Per source name: a SHA-256 of its files' doc ids, sizes and contents (not their paths)
    fingerprints: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the log."""
        how = "cached" if self.cache_hit else "built"
        return (
            f"data {how} in {self.seconds:.1f}s at {self.cache_dir}: "
            f"train {self.train.n_docs} docs / {self.train.n_tokens:,} tokens, "
            f"val {self.val.n_docs} docs / {self.val.n_tokens:,} tokens, "
            f"vocab {self.tokenizer.vocab_size}, {self.n_empty_docs} empty docs skipped"
        )
