"""Data: sources → sentencepiece → tokenize-once cache → packed examples → step-indexed batches.

prepared = prepare_data(cfg.data, model_vocab_size=cfg.model.vocab_size)
train = CausalBatches(prepared.train, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
batch = train.batch(step)  # a pure function of (seed, step)
# A weighted mixture (data.sources): the same, with a per-row source id in the batch.
train = make_train_batches(prepared, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed)
"""

from flaxlm.data.cache import PreparedData, SourceData, assign_splits, prepare_data
from flaxlm.data.causal_batches import BATCH_KEYS, CausalBatches, n_causal_examples, pack_examples
from flaxlm.data.demo import markdown_to_text, unigram_cross_entropy, write_shakespeare
from flaxlm.data.encode import encode_documents, train_tokenizer_on_documents
from flaxlm.data.fingerprints import cache_key
from flaxlm.data.mixture import MIXTURE_BATCH_KEYS, MixtureBatches, make_train_batches
from flaxlm.data.sources import (
    DataError,
    Document,
    SourceSpec,
    SourceStats,
    iter_documents,
    list_source_files,
    resolve_sources,
)
from flaxlm.data.token_split import TokenSplit, tokenize_documents

__all__ = [
    "BATCH_KEYS",
    "CausalBatches",
    "DataError",
    "Document",
    "MIXTURE_BATCH_KEYS",
    "MixtureBatches",
    "PreparedData",
    "SourceData",
    "SourceSpec",
    "SourceStats",
    "TokenSplit",
    "assign_splits",
    "cache_key",
    "encode_documents",
    "iter_documents",
    "list_source_files",
    "make_train_batches",
    "markdown_to_text",
    "n_causal_examples",
    "pack_examples",
    "prepare_data",
    "resolve_sources",
    "tokenize_documents",
    "train_tokenizer_on_documents",
    "unigram_cross_entropy",
    "write_shakespeare",
]
