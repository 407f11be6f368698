"""HuggingFace tokenizers (tokenizer.json): the same ids as transformers' AutoTokenizer, special
roles from the directory, exact reloads from the stored bytes, training through the cache, and
sentencepiece models written as tokenizer.json with the same ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_tokenizers import PROBES, TEXT, bert_tokenizer_dir, gpt2_tokenizer_dir

from flaxlm.config import ConfigError, load_config
from flaxlm.data import iter_documents, prepare_data
from flaxlm.data.mlm_masks import MaskingSpec, ObjectiveConfig
from flaxlm.tokenizers.hf import HFTokenizer
from flaxlm.tokenizers.sentencepiece import Tokenizer, check_vocab, train_tokenizer

transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return gpt2_tokenizer_dir(tmp_path_factory.mktemp("gpt2_tok"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return bert_tokenizer_dir(tmp_path_factory.mktemp("bert_tok"))


def auto_ids(folder: Path, text: str) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(folder).encode(text, add_special_tokens=False)


def test_gpt2_byte_level_directory_encodes_like_autotokenizer(gpt2_dir):
    tok = Tokenizer.load(gpt2_dir)
    reference = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    for text in PROBES:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False), text
    assert tok.encode_batch(PROBES) == [tok.encode(t) for t in PROBES]
    # <|endoftext|> is GPT-2's only special token: bos, eos, pad (and unk, as its config says).
    end = reference.convert_tokens_to_ids("<|endoftext|>")
    assert tok.special_ids() == dict.fromkeys(("pad", "unk", "bos", "eos"), end) | dict.fromkeys(
        ("cls", "sep", "mask")
    )
    assert tok.vocab_size == len(reference)
    text = "  To be,\n\nor not\tto be é 😀 1601  \n"
    assert tok.decode(tok.encode(text)) == text  # byte-level: exact
    assert tok.decode(tok.encode("a") + [end]) == "a"  # specials decode to nothing


def test_bert_wordpiece_directory_keeps_its_special_ids(bert_dir):
    tok = Tokenizer.load(bert_dir / "tokenizer.json")  # the file finds its directory's config
    reference = transformers.AutoTokenizer.from_pretrained(bert_dir)
    for text in PROBES:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False), text
    ids = reference.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == tuple(ids)
    assert (tok.bos_id, tok.eos_id) == (tok.cls_id, tok.sep_id)  # documents end in [SEP]
    spec = MaskingSpec.from_tokenizer(tok, ObjectiveConfig(), seq_len=32)
    assert spec.mask_id == tok.mask_id and spec.is_special[ids].all()
    starts = tok.word_starts()
    for i in range(tok.vocab_size):
        assert starts[i] == (not tok.id_to_piece(i).startswith("##"))


def test_stored_bytes_reload_exactly_with_their_roles(gpt2_dir, tmp_path):
    tok = Tokenizer.load(gpt2_dir, {"pad": "<pad>", "mask": "[MASK]"})  # appended
    assert (tok.pad_id, tok.mask_id, tok.vocab_size) == (400, 401, 402)
    assert tok.encode(PROBES[0]) == Tokenizer.load(gpt2_dir).encode(PROBES[0])
    again = Tokenizer.from_bytes(tok.model_bytes)
    assert isinstance(again, HFTokenizer) and again.model_bytes == tok.model_bytes
    assert again.special_ids() == tok.special_ids()
    # The cache, the run dir and finetune outputs keep the bytes in a file; load reads it.
    (tmp_path / "tokenizer.model").write_bytes(tok.model_bytes)
    assert Tokenizer.load(tmp_path / "tokenizer.model").model_bytes == tok.model_bytes
    # A bare tokenizer.json elsewhere (no config beside it) gets its roles from usual names.
    (tmp_path / "gpt2.json").write_bytes((gpt2_dir / "tokenizer.json").read_bytes())
    assert Tokenizer.load(tmp_path / "gpt2.json").eos_id == tok.eos_id


@pytest.mark.parametrize(
    "specials, message",
    [
        ({"padding": "<pad>"}, "unknown role; expected one of pad, bos, eos, cls, sep, mask"),
        ({"pad": "<padding>"}, "no such token; expected an existing special token or '<pad>'"),
        ({"mask": "the"}, "is ordinary text, not a special token"),
    ],
)
def test_specials_that_cannot_be_mapped_are_refused(gpt2_dir, specials, message):
    with pytest.raises(ValueError) as err:
        Tokenizer.load(gpt2_dir, specials)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_directories_with_only_vocab_files_load_through_transformers(gpt2_dir, bert_dir, tmp_path):
    model = json.loads((gpt2_dir / "tokenizer.json").read_text())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "vocab.json").write_text(json.dumps(model["vocab"]))
    (tmp_path / "gpt2" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "GPT2Tokenizer"}
    (tmp_path / "gpt2" / "tokenizer_config.json").write_text(json.dumps(config))
    vocab = json.loads((bert_dir / "tokenizer.json").read_text())["model"]["vocab"]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text(
        "".join(f"{p}\n" for p in sorted(vocab, key=vocab.get))
    )
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
    (tmp_path / "bert" / "tokenizer_config.json").write_text(json.dumps(config))
    for name, full in (("gpt2", gpt2_dir), ("bert", bert_dir)):
        tok, reference = Tokenizer.load(tmp_path / name), Tokenizer.load(full)
        assert tok.special_ids() == reference.special_ids()
        assert [tok.encode(t) for t in PROBES] == [reference.encode(t) for t in PROBES]
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json, vocab.txt"):
        Tokenizer.load(tmp_path)


def test_training_data_through_an_hf_tokenizer(gpt2_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"Document {i}: naïve  café\n" + TEXT)
    overrides = [f"data.paths=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(None, [*overrides, f"data.tokenizer={gpt2_dir}"])
    data = prepare_data(cfg.data, 512, progress=False)
    assert data.tokenizer.model_bytes == Tokenizer.load(gpt2_dir).model_bytes
    texts = {d.doc_id: d.text for d in iter_documents(cfg.data.paths)}
    doc = data.train.tokens[: data.train.doc_offsets[1]].tolist()
    assert doc[-1] == data.tokenizer.eos_id  # <|endoftext|> ends each document
    assert doc[:-1] == auto_ids(gpt2_dir, texts[data.train.doc_ids()[0]])
    assert prepare_data(cfg.data, 512, progress=False).cache_hit
    # Another tokenizer is another cache entry.
    other = load_config(
        None, [*overrides, f"data.tokenizer={gpt2_dir}", "data.tokenizer_specials={pad: <pad>}"]
    )
    assert not prepare_data(other.data, 512, progress=False).cache_hit
    with pytest.raises(
        ConfigError, match="model.vocab_size=300 is smaller than the tokenizer's vocab size 400"
    ):
        prepare_data(cfg.data, 300, progress=False)
    with pytest.raises(
        ConfigError, match="does not exist; expected a sentencepiece .model, a tokenizer.json"
    ):
        load_config(None, [*overrides, f"data.tokenizer={tmp_path / 'nope'}"])


def test_sentencepiece_bpe_writes_a_tokenizer_json_with_the_same_ids(small_corpus, tmp_path):
    from flaxlm.tokenizers.hf_export import write_tokenizer_files

    files = sorted(small_corpus.iterdir())
    tok = Tokenizer.load(train_tokenizer(files[:2], tmp_path / "sp", vocab_size=600))
    written = write_tokenizer_files(tok, tmp_path / "hf", model_max_length=64)
    assert written == [
        "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"
    ]  # fmt: skip
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = [p for p in PROBES if "<|" not in p]
    texts += ["[MASK] [CLS] mask", "\n", "   ", "ﬁ ① ẞ 𝔘 \u200b", files[2].read_text()[:20000]]
    for text in texts:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False), text[:40]
        ids = tok.encode(text)
        assert reference.decode(ids) == tok.decode(ids), text[:40]
    assert reference.mask_token_id == tok.mask_id and reference.pad_token_id == tok.pad_id
    assert (reference.bos_token_id, reference.eos_token_id) == (tok.bos_id, tok.eos_id)
    unigram = Tokenizer.load(train_tokenizer(files[:1], tmp_path / "u", 500, "unigram"))
    assert write_tokenizer_files(unigram, tmp_path / "hf_u") == ["tokenizer.model"]
    check_vocab(Tokenizer.load(tmp_path / "hf" / "tokenizer.model"), 600)


def test_byte_level_bpe_training_is_exact_deterministic_and_cached(small_corpus, tmp_path):
    from flaxlm.tokenizers.hf_export import write_tokenizer_files

    files = sorted(small_corpus.iterdir())[:1]
    path = train_tokenizer(files, tmp_path / "a" / "tok", 400, model_type="byte_bpe")
    again = train_tokenizer(files, tmp_path / "b" / "other", 400, model_type="byte_bpe")
    assert path.read_bytes() == again.read_bytes()  # same text, same bytes on every host
    tok = Tokenizer.load(path)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 400
    assert list(tok.special_ids().values()) == list(range(7))  # flaxlm's fixed ids
    text = "  To be,\n\nor not\tto be é 😀 12345  \nthe end\n"
    assert tok.decode(tok.encode(text)) == text
    assert (tmp_path / "a" / "tok.vocab").read_text().splitlines()[:2] == ["<pad>", "<unk>"]
    with pytest.raises(ValueError, match="vocab_size=100 failed: its 256 bytes and 7 specials"):
        train_tokenizer(files, tmp_path / "small", 100, model_type="byte_bpe")
    with pytest.raises(ValueError, match="normalization='nfkc' applies to sentencepiece types"):
        train_tokenizer(files, tmp_path / "n", 400, model_type="byte_bpe", normalization="nfkc")
    write_tokenizer_files(tok, tmp_path / "hf")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for probe in PROBES:
        assert reference.encode(probe, add_special_tokens=False) == tok.encode(probe)

    overrides = [
        f"data.paths=[{files[0]}]", f"data.cache_dir={tmp_path / 'cache'}", "data.doc_split=lines",
        "data.tokenizer_type=byte_bpe", "data.tokenizer_vocab_size=400",
    ]  # fmt: skip
    data = prepare_data(load_config(None, overrides).data, 400, progress=False)
    assert isinstance(data.tokenizer, HFTokenizer) and data.tokenizer.eos_id == 3
    assert prepare_data(load_config(None, overrides).data, 400, progress=False).cache_hit
