"""Tokenizers users bring or train: CJK coverage, options, foreign models and special mapping."""

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from flaxlm.config import ConfigError, DataConfig, load_config
from flaxlm.data import iter_documents, prepare_data, train_tokenizer_on_documents
from flaxlm.data.sources import Document
from flaxlm.tokenizers.sentencepiece import Tokenizer, map_special_tokens, train_tokenizer


def cjk_corpus(n_chars: int = 2500, seed: int = 0) -> list[str]:
    """Lines over ``n_chars`` CJK ideographs with Zipf-like frequencies, plus kana and spaces."""
    rng = np.random.default_rng(seed)
    chars = [chr(0x4E00 + i) for i in range(n_chars)]
    p = 1.0 / np.arange(1, n_chars + 1)
    lines = []
    for i in range(600):
        body = "".join(rng.choice(chars, size=40, p=p / p.sum()))
        lines.append(f"{body[:20]}、{body[20:]}。 です  {i}")
    lines += ["".join(chars[j : j + 50]) for j in range(0, n_chars, 50)]  # every char at least once
    return lines


def test_cjk_tokenizer_with_full_character_coverage_round_trips_exactly(tmp_path):
    lines = cjk_corpus()
    docs = [Document(f"d{i}", line) for i, line in enumerate(lines)]
    model = train_tokenizer_on_documents(
        docs, tmp_path / "cjk", vocab_size=3400, model_type="bpe", character_coverage=1.0
    )
    tok = Tokenizer.load(model)
    text = "\n".join(lines)
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # exact, spaces and newlines included
    # Full coverage: every training character has a piece of its own; only the newline (never
    # inside a training line) falls back to a byte.
    assert {p for p in map(tok.id_to_piece, ids) if p.startswith("<0x")} == {"<0x0A>"}
    assert all(tok.id_to_piece(tok.encode(c)[0]) == c.replace(" ", "▁") for c in set(text) - {"\n"})

    partial = train_tokenizer_on_documents(
        docs, tmp_path / "partial", vocab_size=3400, character_coverage=0.98
    )
    partial_tok = Tokenizer.load(partial)
    as_bytes = [
        c for c in set(text) - {"\n"}
        if partial_tok.id_to_piece(partial_tok.encode(c)[0]).startswith("<0x")
    ]  # fmt: skip
    assert len(as_bytes) > 100 and max(text.count(c) for c in as_bytes) <= 2  # the rarest ones
    assert partial_tok.decode(partial_tok.encode(text)) == text  # still exact


def test_training_options_reach_sentencepiece(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("To  be, or not to be ﬁne\n" * 50)
    lossy = Tokenizer.load(
        train_tokenizer([corpus], tmp_path / "nfkc", 300, "unigram", normalization="nmt_nfkc")
    )
    assert lossy.decode(lossy.encode("To  be ﬁne")) == "To be fine"  # NFKC + collapsed spaces
    exact = Tokenizer.load(train_tokenizer([corpus], tmp_path / "id", 300, "unigram"))
    assert exact.decode(exact.encode("To  be ﬁne")) == "To  be ﬁne"
    no_bytes = Tokenizer.load(train_tokenizer([corpus], tmp_path / "nb", 60, byte_fallback=False))
    assert no_bytes.encode("é") == [no_bytes.unk_id]
    with pytest.raises(ValueError, match="normalization='nfd'"):
        train_tokenizer([corpus], tmp_path / "x", 300, normalization="nfd")


def test_training_options_from_the_config_change_the_cache_key(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(6):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"雪 {i} " * 40)
    base = dict(paths=[str(tmp_path / "corpus")], cache_dir=str(tmp_path / "cache"),
                tokenizer_vocab_size=300)  # fmt: skip
    exact = prepare_data(DataConfig(**base), progress=False)
    unigram = prepare_data(
        DataConfig(**base, tokenizer_type="unigram", tokenizer_character_coverage=0.9995,
                   tokenizer_normalization="nfkc"), progress=False,
    )  # fmt: skip
    assert unigram.cache_dir != exact.cache_dir
    with pytest.raises(ConfigError, match="data.tokenizer_character_coverage=0.0 must be in"):
        load_config(None, ["data.tokenizer_character_coverage=0"])
    with pytest.raises(ConfigError, match="data.tokenizer_normalization='nfd' is not one of"):
        load_config(None, ["data.tokenizer_normalization=nfd"])


def mistral_model() -> Path:
    try:
        dist = importlib.metadata.distribution("mistral_common")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs pip install --no-deps mistral-common==1.13.1 (a 32k BPE model)")
    return Path(dist.locate_file("mistral_common/data/tokenizer.model.v1"))


def test_foreign_32k_model_loads_with_mapped_and_appended_specials(tmp_path):
    path = mistral_model()
    with pytest.raises(ValueError, match=r"has no pad token.*tokenizer_specials=\{pad: <pad>\}"):
        Tokenizer.load(path)
    shared = Tokenizer.load(path, {"pad": "</s>"})
    assert (shared.vocab_size, shared.pad_id, shared.eos_id, shared.bos_id) == (32000, 2, 2, 1)
    assert shared.mask_id is None
    full = Tokenizer.load(path, {"pad": "<pad>", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"})
    assert full.vocab_size == 32004
    assert (full.pad_id, full.cls_id, full.sep_id, full.mask_id) == (32000, 32001, 32002, 32003)
    original = spm.SentencePieceProcessor(model_file=str(path))
    text = "Hello  world, [MASK] <pad> 雪が降る\n\tcafé 😀 1234"
    assert full.encode(text) == original.encode(text)  # appending specials changes no text
    assert full.decode(full.encode(text) + [full.mask_id, full.pad_id]) == original.decode(
        original.encode(text)
    )
    # The mapping lives in the model bytes: a checkpoint's tokenizer reloads without it.
    again = Tokenizer.from_bytes(full.model_bytes)
    assert (again.pad_id, again.mask_id, again.vocab_size) == (32000, 32003, 32004)


@pytest.mark.parametrize(
    "specials, message",
    [
        ({"pad": "<unk>"}, "piece id 0 has type UNKNOWN, not CONTROL"),
        ({"pad": "▁the"}, "piece id 272 has type NORMAL, not CONTROL"),
        ({"pad": "<padding>"}, "no such piece; expected an existing control piece or '<pad>'"),
        ({"mask": "</s>"}, "cannot rename piece id 2 to '[MASK]'"),
        ({"padding": "<pad>"}, "unknown role; expected one of pad, bos, eos, cls, sep, mask"),
    ],
)
def test_specials_that_cannot_be_mapped_are_refused(specials, message):
    path = mistral_model()
    with pytest.raises(ValueError) as err:
        Tokenizer.load(path, specials)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_control_piece_is_renamed_for_cls_sep_mask(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text to learn from\n" * 30)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=60, pad_id=3,
        control_symbols=["<ctl0>"], hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    raw = (tmp_path / "m.model").read_bytes()
    tok = Tokenizer.from_bytes(map_special_tokens(raw, {"mask": "<ctl0>"}))
    assert tok.mask_id == 4 and tok.id_to_piece(4) == "[MASK]"
    assert tok.vocab_size == Tokenizer.from_bytes(raw).vocab_size  # renamed, nothing appended


def test_foreign_model_through_the_config_and_cache(tmp_path):
    path = mistral_model()
    (tmp_path / "c").mkdir()
    for i in range(4):
        (tmp_path / "c" / f"{i}.txt").write_text(f"Document {i}: the quick brown fox. " * 5)
    overrides = [
        f"data.paths=[{tmp_path / 'c'}]", f"data.cache_dir={tmp_path / 'cache'}",
        f"data.tokenizer={path}", "data.tokenizer_specials={pad: </s>}", "model.vocab_size=32000",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    data = prepare_data(cfg.data, cfg.model.vocab_size, progress=False)
    assert data.tokenizer.vocab_size == 32000 and data.tokenizer.pad_id == 2
    assert data.train.tokens.dtype == np.uint16
    texts = {d.doc_id: d.text for d in iter_documents(cfg.data.paths)}
    doc = data.train.tokens[: data.train.doc_offsets[1]].tolist()
    assert doc[-1] == data.tokenizer.eos_id
    assert data.tokenizer.decode(doc[:-1]) == texts[data.train.doc_ids()[0]]
    with pytest.raises(ConfigError, match="model.vocab_size=32000 is smaller"):
        appended = [
            *overrides[:3],
            "data.tokenizer_specials={pad: <pad>}",
            "model.vocab_size=32000",
        ]
        prepare_data(load_config(None, appended).data, 32000, progress=False)
