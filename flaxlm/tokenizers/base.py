"""The tokenizer interface every part of flaxlm codes against, and the special tokens of the
tokenizers flaxlm trains. The kinds live in :mod:`flaxlm.tokenizers.sentencepiece` (sentencepiece)
and
:mod:`flaxlm.tokenizers.hf` (HuggingFace); import :class:`Tokenizer` from
``flaxlm.tokenizers.sentencepiece``,
which defines both, so that ``Tokenizer.load`` knows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
# The roles a given tokenizer's tokens can be mapped to, and the token appended for each.
SPECIAL_ROLES = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "cls": "[CLS]", "sep": "[SEP]",
                 "mask": "[MASK]"}  # fmt: skip


class Tokenizer:
    """What flaxlm asks of a tokenizer: ids of text, text of ids, and the special ids.

    Two kinds implement it: :class:`flaxlm.tokenizers.sentencepiece.SentencePieceTokenizer` (a
    ``.model``)
    and :class:`flaxlm.tokenizers.hf.HFTokenizer` (a HuggingFace ``tokenizer.json``).
    :meth:`load` and :meth:`from_bytes` tell them apart by the bytes, so a checkpoint, a run
    dir or the data cache reloads either from :attr:`model_bytes` alone.

    ``cls_id``/``sep_id``/``mask_id`` are None for a tokenizer that lacks them (``unk_id``
    too, for a byte-level BPE); pad, bos and eos are required.
    """

    source: str
    vocab_size: int
    pad_id: int
    unk_id: int | None
    bos_id: int
    eos_id: int
    cls_id: int | None
    sep_id: int | None
    mask_id: int | None

    # The kinds (subclasses) in definition order; load / from_bytes ask each whether it reads
    # the bytes. Importing flaxlm.tokenizers.sentencepiece defines both, so its Tokenizer knows
    # them.
    _kinds: ClassVar[list[type[Tokenizer]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Tokenizer._kinds.append(cls)

    @classmethod
    def reads(cls, data: bytes | None) -> bool:
        """Whether this kind reads a file with ``data`` (None: a directory)."""
        return False

    @classmethod
    def load(cls, path: str | Path, specials: dict[str, str] | None = None) -> Tokenizer:
        """Loads a sentencepiece ``.model``, an HF ``tokenizer.json``, or an HF tokenizer
        directory (or the bytes a run stored), mapping missing specials (role -> token)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer model {str(path)!r} does not exist")
        return cls._kind(None if path.is_dir() else path.read_bytes(), path).load(path, specials)

    @classmethod
    def from_bytes(cls, model_bytes: bytes, source: str = "<bytes>") -> Tokenizer:
        """The tokenizer of :attr:`model_bytes` (as stored in checkpoints): a sentencepiece
        model proto, or flaxlm's JSON of an HF tokenizer and its specials."""
        return cls._kind(model_bytes, source).from_bytes(model_bytes, source)

    @classmethod
    def _kind(cls, data: bytes | None, source: Any) -> type[Tokenizer]:
        kind = next((k for k in Tokenizer._kinds if k.reads(data)), None)
        if kind is None:
            raise ValueError(
                f"tokenizer {source} is not one flaxlm reads; expected a sentencepiece .model, "
                "a tokenizer.json or an HF tokenizer directory"
            )
        return kind

    @property
    def model_bytes(self) -> bytes:
        """The serialized tokenizer (store it next to the weights to decode later)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no bos/eos are added."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, encoded on all cores."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``; special tokens decode to nothing."""
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i``."""
        raise NotImplementedError

    def word_starts(self) -> np.ndarray:
        """(vocab_size,) bool: whether each id's piece begins a word (whole-word masking)."""
        raise NotImplementedError

    def special_ids(self) -> dict[str, int | None]:
        """Role -> id for pad, unk, bos, eos, cls, sep, mask (None where there is none)."""
        roles = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")
        return {role: getattr(self, f"{role}_id") for role in roles}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source}, vocab_size={self.vocab_size})"


def is_json(data: bytes) -> bool:
    """Whether ``data`` looks like JSON (a tokenizer.json) rather than a model proto."""
    # A sentencepiece model proto starts with field 1 (0x0a); tokenizer.json with "{".
    return data.lstrip()[:1] == b"{"


def missing_specials_error(source: str, missing: list[str], expected: str, fix: str) -> ValueError:
    """The one-line error for a tokenizer lacking special roles, with a mapping to try."""
    example = ", ".join(f"{m}: {SPECIAL_ROLES.get(m, '?')}" for m in missing)
    return ValueError(
        f"tokenizer {source} has no {'/'.join(missing)} token; expected {expected}: map each to "
        f"{fix} or append one, e.g. data.tokenizer_specials={{{example}}}"
    )
