"""Text to token ids: batched sentencepiece encoding of documents (each closed by ``</s>``),
and training a tokenizer on documents from any source."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from flaxlm.data.sources import Document
from flaxlm.tokenizers.sentencepiece import Tokenizer, train_tokenizer

# Characters per encode_batch call: enough to keep sentencepiece's threads busy.
ENCODE_BATCH_CHARS = 4_000_000


def encode_documents(
    docs: Iterable[Document], tokenizer: Tokenizer
) -> Iterator[tuple[Document, list[int]]]:
    """Yields (document, its token ids followed by ``</s>``), encoding many documents per call."""
    pending: list[Document] = []
    n_chars = 0
    for doc in docs:
        pending.append(doc)
        n_chars += len(doc.text)
        if n_chars >= ENCODE_BATCH_CHARS:
            yield from _encode_pending(pending, tokenizer)
            pending, n_chars = [], 0
    yield from _encode_pending(pending, tokenizer)


def _encode_pending(
    pending: list[Document], tokenizer: Tokenizer
) -> Iterator[tuple[Document, list[int]]]:
    if not pending:
        return
    encoded = tokenizer.encode_batch([doc.text for doc in pending])
    for doc, ids in zip(pending, encoded, strict=True):
        ids.append(tokenizer.eos_id)
        yield doc, ids


def train_tokenizer_on_documents(
    docs: Iterable[Document],
    model_prefix: Path,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 1.0,
    normalization: str = "identity",
) -> Path:
    """Trains a tokenizer on documents (from any source, jsonl included); returns the .model.

    The options are those of :func:`flaxlm.tokenizers.sentencepiece.train_tokenizer`.
    """
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    # sentencepiece reads sentences from files, one per line.
    with tempfile.TemporaryDirectory(prefix=".text-", dir=model_prefix.parent) as tmp:
        text_file = Path(tmp) / "text.txt"
        with open(text_file, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(doc.text + "\n")
        return train_tokenizer(
            [text_file],
            model_prefix,
            vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            normalization=normalization,
        )


def token_dtype(vocab_size: int) -> type:
    """uint16 while every id fits (ids < 65536), else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32
