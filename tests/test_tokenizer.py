"""Tokenizer: fixed special ids, exact round trips, atomic training, foreign models, vocab check."""

from pathlib import Path

import pytest
import sentencepiece as spm
from hf_tokenizers import HAMLET

from flaxlm.config import ConfigError
from flaxlm.tokenizers.sentencepiece import SPECIAL_TOKENS, Tokenizer, check_vocab, train_tokenizer

CORPUS = HAMLET


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    corpus = tmp / "corpus.txt"
    corpus.write_text(CORPUS * 3)
    return train_tokenizer([corpus], tmp / "tok", vocab_size=400)


@pytest.fixture(scope="module")
def tok(model_path) -> Tokenizer:
    return Tokenizer.load(model_path)


def test_special_tokens_have_fixed_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert (tok.cls_id, tok.sep_id, tok.mask_id) == (4, 5, 6)
    assert [tok.id_to_piece(i) for i in range(7)] == list(SPECIAL_TOKENS)


def test_round_trip_is_exact_for_spaces_newlines_and_unseen_characters(tok):
    text = "  To  be,\n\nor not\tto be é 😀 12345  \nthe end\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    # Digits are split one per token (split_digits), so numbers tokenize uniformly.
    assert [tok.id_to_piece(i) for i in tok.encode("1601")] == ["1", "6", "0", "1"]


def test_encode_batch_matches_encode(tok):
    texts = ["To be", "", "or not to be\n", "question  mark?"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_model_bytes_round_trip(tok, model_path):
    assert tok.model_bytes == model_path.read_bytes()
    again = Tokenizer.from_bytes(tok.model_bytes)
    assert again.vocab_size == tok.vocab_size
    assert again.encode(CORPUS) == tok.encode(CORPUS)


def test_small_corpus_gets_smaller_vocab_instead_of_error(tok):
    assert 7 + 256 < tok.vocab_size <= 400


def test_failed_training_leaves_nothing_behind(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "out"
    out.mkdir()
    # 50 pieces cannot hold the 7 specials plus 256 byte-fallback pieces.
    with pytest.raises(ValueError, match="vocab_size=50"):
        train_tokenizer([corpus], out / "tok", vocab_size=50)
    assert list(out.iterdir()) == []


def test_training_is_deterministic(tmp_path, model_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS * 3)
    again = train_tokenizer([corpus], tmp_path / "again", vocab_size=400)
    # Same text, other paths: the same bytes (no path or thread count leaks into the model).
    assert again.read_bytes() == model_path.read_bytes()
    assert (tmp_path / "again.vocab").read_text().startswith("<pad>\t0\n<unk>\t0\n")


def test_bad_model_type_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="model_type='char'"):
        train_tokenizer([tmp_path / "x.txt"], tmp_path / "tok", 300, model_type="char")


def _foreign_model(tmp_path: Path, **kwargs) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS * 3)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "foreign"), vocab_size=80,
        minloglevel=2, **kwargs,
    )  # fmt: skip
    return tmp_path / "foreign.model"


def test_foreign_model_without_pad_is_rejected(tmp_path):
    path = _foreign_model(tmp_path)  # sentencepiece's default has no pad token
    with pytest.raises(ValueError, match="has no pad token"):
        Tokenizer.load(path)


def test_foreign_model_without_cls_sep_mask_loads(tmp_path):
    tok = Tokenizer.load(_foreign_model(tmp_path, pad_id=3))
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.cls_id is None and tok.sep_id is None and tok.mask_id is None


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.load(tmp_path / "nope.model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.from_bytes(b"not a model")


def test_check_vocab_names_both_sizes(tok):
    check_vocab(tok, tok.vocab_size)
    check_vocab(tok, 8192)
    with pytest.raises(ConfigError) as err:
        check_vocab(tok, 100)
    message = str(err.value)
    assert "model.vocab_size=100" in message and str(tok.vocab_size) in message
    assert "\n" not in message


def test_long_lines_are_split_for_training_and_the_error_is_never_empty(tmp_path):
    """A corpus whose every line is longer than sentencepiece's sentence limit (JSONL
    paragraphs) once failed with an empty message; now its lines are cut for training."""
    from flaxlm.tokenizers.sentencepiece import MAX_SENTENCE_BYTES, split_long_line, train_tokenizer

    words = [f"word{i % 97} thé{i % 13}" for i in range(3000)]
    line = " ".join(words)
    assert len(line.encode()) > 4 * MAX_SENTENCE_BYTES
    pieces = list(split_long_line(line))
    assert "".join(pieces) == line
    assert all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in pieces) and len(pieces) >= 4
    assert list(split_long_line("é" * 5000, 4001)) == ["é" * 2000, "é" * 2000, "é" * 1000]
    corpus = tmp_path / "long.txt"
    corpus.write_text("\n".join([line] * 5) + "\n", encoding="utf-8")
    tok = Tokenizer.load(train_tokenizer([corpus], tmp_path / "tok", vocab_size=300))
    assert tok.decode(tok.encode(words[5])) == words[5]
