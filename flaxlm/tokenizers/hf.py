"""HuggingFace tokenizers (a ``tokenizer.json``: GPT-2 byte-level BPE, BERT WordPiece, ...)
behind flaxlm's :class:`~flaxlm.tokenizers.sentencepiece.Tokenizer` interface, through the
``tokenizers``
library.

    tok = Tokenizer.load("hf/gpt2")                  # a directory with tokenizer.json
    tok = Tokenizer.load("hf/bert/tokenizer.json")   # the file (its directory's configs too)
    tok = Tokenizer.load("hf/gpt2", {"pad": "<pad>"})  # append a pad token (id = vocab size)

Which token plays which role (pad, unk, bos, eos, cls, sep, mask) is decided once, at load:

1. ``special_tokens_map.json`` / ``tokenizer_config.json`` beside the tokenizer
   (``bos_token``, ``pad_token``, ...), or what ``transformers`` says for a directory that has
   only ``vocab.txt`` / ``vocab.json`` + ``merges.txt``;
2. else a special token with a usual name: ``[PAD]`` ``[UNK]`` ``[CLS]`` ``[SEP]`` ``[MASK]``,
   ``<pad>`` ``<unk>`` ``<s>`` ``</s>`` ``<mask>``, GPT-2's ``<|endoftext|>`` (bos and eos);
3. ``specials`` (``data.tokenizer_specials``) overrides: role -> an existing special token, or
   the role's standard token (``SPECIAL_ROLES``: ``<pad>``, ``[MASK]``, ...) appended;
4. what is still missing falls back: eos to sep, bos to cls or eos, pad to eos (GPT-2 has one
   special token, ``<|endoftext|>``, for all three). unk, cls, sep, mask may stay None.

The result is stored as flaxlm's JSON, ``{"format", "specials", "tokenizer_json"}``
(:attr:`HFTokenizer.model_bytes`): the checkpoint, the run dir and the data cache keep it, and
``Tokenizer.from_bytes`` reloads exactly it, roles included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from flaxlm.tokenizers.base import (
    SPECIAL_ROLES,
    SPECIAL_TOKENS,
    Tokenizer,
    is_json,
    missing_specials_error,
)

FORMAT = "flaxlm-hf-tokenizer/1"
TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # later ones win
ROLES = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")
# Usual names of each role's token, looked up among a tokenizer's special tokens.
KNOWN_NAMES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "bos": ("<s>", "<|endoftext|>", "<|begin_of_text|>", "<bos>"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}
FALLBACKS = {"eos": ("sep",), "bos": ("cls", "eos"), "pad": ("eos",)}
# data.tokenizer_type values that train an HF tokenizer (train_hf_tokenizer).
HF_MODEL_TYPES = ("byte_bpe",)


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "HuggingFace tokenizers need the tokenizers package: pip install tokenizers"
        ) from e
    return tokenizers


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` plus the role of each special token (module doc)."""

    def __init__(self, tokenizer_json: str, specials: dict[str, str], source: str = "<bytes>"):
        self.source = source
        self.tokenizer_json = tokenizer_json
        self.specials = dict(specials)
        self._tok = _tokenizers().Tokenizer.from_str(tokenizer_json)
        # Saved tokenizer.json files may truncate or pad (e.g. to 512): flaxlm never wants it.
        self._tok.no_truncation()
        self._tok.no_padding()
        ids = self._tok.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(ids) + 1 if ids else 0
        for role in ROLES:
            token = specials.get(role)
            i = None if token is None else self._tok.token_to_id(token)
            if token is not None and i is None:
                raise ValueError(f"tokenizer {source}: special {role}={token!r} is not a token")
            setattr(self, f"{role}_id", i)
        missing = [r for r in ("pad", "bos", "eos") if getattr(self, f"{r}_id") is None]
        if missing:
            raise missing_specials_error(source, missing, "pad, bos and eos", "a special token")

    @classmethod
    def reads(cls, data: bytes | None) -> bool:
        """A directory, or a JSON file (a tokenizer.json, or flaxlm's stored JSON)."""
        return data is None or is_json(data)

    @classmethod
    def load(cls, path: str | Path, specials: dict[str, str] | None = None) -> HFTokenizer:
        """A ``tokenizer.json`` (or flaxlm's stored JSON), or an HF tokenizer directory."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if path.is_dir() and not (path / TOKENIZER_JSON).is_file():
            tokenizer_json, declared = _from_transformers(path)
        else:
            file = path / TOKENIZER_JSON if path.is_dir() else path
            tokenizer_json, declared = _read_tokenizer(file.read_text(encoding="utf-8"), file)
            if file.name == TOKENIZER_JSON:
                declared.update(_declared_in(folder))
        return _resolved(tokenizer_json, declared, specials or {}, str(path))

    @classmethod
    def from_bytes(cls, model_bytes: bytes, source: str = "<bytes>") -> HFTokenizer:
        """Loads :attr:`model_bytes` (or a bare ``tokenizer.json``'s bytes)."""
        tokenizer_json, declared = _read_tokenizer(model_bytes.decode("utf-8"), source)
        return _resolved(tokenizer_json, declared, {}, source)

    @property
    def model_bytes(self) -> bytes:
        """flaxlm's JSON: the ``tokenizer.json`` text and the role -> token map."""
        doc = {"format": FORMAT, "specials": self.specials, "tokenizer_json": self.tokenizer_json}
        return json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no bos/eos/cls/sep are added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, encoded on all cores."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``; special tokens decode to nothing."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i`` ("" for an id the vocabulary skips)."""
        return self._tok.id_to_token(int(i)) or ""

    def word_starts(self) -> np.ndarray:
        """(vocab_size,) bool. WordPiece: pieces without the ``##`` continuation prefix;
        others: pieces that begin with a space (``Ġ`` byte-level, ``▁`` metaspace)."""
        model = json.loads(self.tokenizer_json)["model"]
        pieces = [self.id_to_piece(i) for i in range(self.vocab_size)]
        if model.get("type") == "WordPiece":
            prefix = model.get("continuing_subword_prefix") or "##"
            return np.array([bool(p) and not p.startswith(prefix) for p in pieces], dtype=bool)
        return np.array([p.startswith(("\u0120", "\u2581")) for p in pieces], dtype=bool)


def _read_tokenizer(text: str, source: Any) -> tuple[str, dict[str, str]]:
    """(tokenizer.json text, declared roles) of a tokenizer.json or of flaxlm's JSON."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer {source} is not JSON: {e}") from e
    if isinstance(doc, dict) and doc.get("format") == FORMAT:
        return doc["tokenizer_json"], dict(doc["specials"])
    if not (isinstance(doc, dict) and "model" in doc):
        raise ValueError(
            f"tokenizer {source} is not a HuggingFace tokenizer.json (no 'model' key); "
            "expected a tokenizer.json, a sentencepiece .model or an HF tokenizer directory"
        )
    return text, {}


def _token_text(value: Any) -> str | None:
    """A special token as config files write it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _declared_in(folder: Path) -> dict[str, str]:
    """Role -> token from ``tokenizer_config.json`` / ``special_tokens_map.json``."""
    declared: dict[str, str] = {}
    for name in CONFIG_FILES:
        if (folder / name).is_file():
            config = json.loads((folder / name).read_text(encoding="utf-8"))
            for role in ROLES:
                token = _token_text(config.get(f"{role}_token"))
                if token is not None:
                    declared[role] = token
    return declared


def _from_transformers(folder: Path) -> tuple[str, dict[str, str]]:
    """The tokenizer of an HF directory without tokenizer.json (``vocab.txt``, ``vocab.json``
    + ``merges.txt``), converted by ``transformers``' fast tokenizer."""
    if not any((folder / n).is_file() for n in ("vocab.txt", "vocab.json", "tokenizer.model")):
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json, vocab.txt, vocab.json or tokenizer.model"
        )
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"{folder} has no tokenizer.json; converting its vocab files needs the hf extra: "
            "pip install 'flaxlm[hf]'"
        ) from e
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"transformers has no fast tokenizer for {folder}; save a tokenizer.json")
    declared = {r: getattr(hf, f"{r}_token", None) for r in ROLES}
    return backend.to_str(), {r: t for r, t in declared.items() if isinstance(t, str) and t}


def _resolved(
    tokenizer_json: str, declared: dict[str, str], given: dict[str, str], source: str
) -> HFTokenizer:
    """The tokenizer with every role decided (module doc), appending given standard tokens."""
    tk = _tokenizers()
    tok = tk.Tokenizer.from_str(tokenizer_json)
    added = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    roles = {r: t for r, t in declared.items() if r in ROLES and tok.token_to_id(t) is not None}
    for role in ROLES:
        name = next((n for n in KNOWN_NAMES[role] if n in added), None)
        if role not in roles and name is not None:
            roles[role] = name
    appended = []
    for role, token in given.items():
        where = f"tokenizer {source}: data.tokenizer_specials.{role}={token!r}"
        if role not in SPECIAL_ROLES:
            raise ValueError(f"{where}: unknown role; expected one of {', '.join(SPECIAL_ROLES)}")
        if tok.token_to_id(token) is None:
            if token != SPECIAL_ROLES[role]:
                raise ValueError(
                    f"{where}: no such token; expected an existing special token or "
                    f"{SPECIAL_ROLES[role]!r} to append one"
                )
            appended.append(tk.AddedToken(token, special=True, normalized=False))
        elif token not in added:
            raise ValueError(
                f"{where}: token id {tok.token_to_id(token)} is ordinary text, not a special "
                f"token; expected a special token or {SPECIAL_ROLES[role]!r} to append one"
            )
        roles[role] = token
    if appended:
        tok.add_special_tokens(appended)
        tokenizer_json = tok.to_str()
    for role, others in FALLBACKS.items():
        other = next((o for o in others if o in roles), None)
        if role not in roles and other is not None:
            roles[role] = roles[other]
    return HFTokenizer(tokenizer_json, {r: roles[r] for r in ROLES if r in roles}, source)


def train_hf_tokenizer(lines: Iterable[str], vocab_size: int, model_type: str) -> HFTokenizer:
    """Trains an HF tokenizer with flaxlm's special tokens at their fixed ids (0..6).

    ``byte_bpe``: GPT-2's byte-level BPE (its pre-tokenizer regex, no added prefix space):
    every text round-trips exactly, no unknown tokens, and the same text gives the same bytes
    on every host. (``tokenizers``' WordPiece trainer is not offered: it breaks ties between
    equally frequent merges differently from run to run.)
    """
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not one of {', '.join(HF_MODEL_TYPES)}")
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(lines, trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(
            f"{model_type} training with vocab_size={vocab_size} failed: its 256 bytes and "
            f"{len(SPECIAL_TOKENS)} specials take {tok.get_vocab_size()}; expected vocab_size "
            "at least that"
        )
    roles = dict(zip(ROLES, SPECIAL_TOKENS, strict=True))
    return HFTokenizer(tok.to_str(), roles, source="trained")
