"""Small HuggingFace tokenizer directories built here (no downloads): a GPT-2-style byte-level
BPE and a BERT-style WordPiece, trained with the ``tokenizers`` library on a few KB of text
and saved by ``transformers``' fast tokenizers, as the real gpt2 / bert-base directories are."""

from __future__ import annotations

from pathlib import Path

# The soliloquy test_tokenizer.py trains on, plus characters it never shows.
HAMLET = """\
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep; 1601
"""
TEXT = HAMLET + "Café, naïve, façade: déjà vu. Straße, Ærø, Ωmega — “quoted” 雪が降る\n"
# Strings the tests compare ids on: leading and repeated spaces, newlines, tabs, unicode
# the training text never showed, digits, and the special tokens' own text.
PROBES = [
    "To be, or not to be",
    " leading space",
    "  two  spaces and a trailing one ",
    "lines\n\nwith\n blank ones\n",
    "\ttabbed\tText",
    "naïve café 你好 🎉 Ωmega",
    "numbers 1601 and 3.14159",
    "[MASK] and [CLS]x[SEP] <|endoftext|> inside",
    "",
]


def _lines() -> list[str]:
    return (TEXT * 4).splitlines()


def gpt2_tokenizer_dir(out: Path, vocab_size: int = 400) -> Path:
    """A GPT-2-style directory: byte-level BPE, ``<|endoftext|>`` its only special token."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(_lines(), trainer)
    end = "<|endoftext|>"
    fast = transformers.GPT2TokenizerFast(
        tokenizer_object=tok, bos_token=end, eos_token=end, unk_token=end
    )
    fast.save_pretrained(out)
    return out


def bert_tokenizer_dir(out: Path, vocab_size: int = 300) -> Path:
    """A BERT-style directory: lower-cased WordPiece, [PAD] [UNK] [CLS] [SEP] [MASK] = 0..4."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(_lines(), trainer)
    transformers.BertTokenizerFast(tokenizer_object=tok).save_pretrained(out)
    return out
