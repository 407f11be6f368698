"""Tokenizers: sentencepiece models with fixed special-token ids, or HuggingFace ones.

Every tokenizer flaxlm trains has the same special tokens at the same ids:

    <pad>=0  <unk>=1  <s>=2  </s>=3  [CLS]=4  [SEP]=5  [MASK]=6

Training keeps text exactly by default (identity normalisation, whitespace kept, no dummy
prefix, bytes for unseen characters), so ``decode(encode(text)) == text`` for any text.

    path = train_tokenizer([Path("corpus.txt")], Path("out/tok"), vocab_size=8192)
    tok = Tokenizer.load(path)
    ids = tok.encode("To be, or not to be")

Code asks the tokenizer for its special ids (``tok.pad_id``, ``tok.mask_id``, ...), never
assumes them, so a given tokenizer works as well: a sentencepiece ``.model``, or a HuggingFace
``tokenizer.json`` / tokenizer directory (GPT-2 byte-level BPE, BERT WordPiece; see
:mod:`flaxlm.tokenizers.hf`). ``Tokenizer.load`` tells them apart by content.

A foreign model (e.g. a 32k Llama/Mistral BPE) that lacks some specials gets them mapped:
``Tokenizer.load(path, specials={"pad": "</s>", "mask": "[MASK]"})`` reuses the control piece
``</s>`` as pad and appends ``[MASK]`` as a new control piece (id = old vocab size). The mapping
is written into the model bytes, so a checkpoint's tokenizer reloads without it.
"""

from __future__ import annotations

import io
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from flaxlm.config import CHOICES, ConfigError
from flaxlm.tokenizers.base import (
    BOS_ID,
    CLS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_ROLES,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
    is_json,
    missing_specials_error,
)
from flaxlm.tokenizers.hf import HF_MODEL_TYPES, HFTokenizer, train_hf_tokenizer

__all__ = [
    "BOS_ID", "CLS_ID", "EOS_ID", "MASK_ID", "PAD_ID", "SEP_ID", "SPECIAL_ROLES",
    "SPECIAL_TOKENS", "UNK_ID", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer",
    "check_vocab", "map_special_tokens", "train_tokenizer",
]  # fmt: skip

MODEL_TYPES = CHOICES["data.tokenizer_type"]
NORMALIZATIONS = CHOICES["data.tokenizer_normalization"]
WORD_START = "\u2581"  # sentencepiece's escaped space: a piece that starts a word

# sentencepiece samples this many lines at most; more only costs memory and time.
MAX_TRAINING_SENTENCES = 2_000_000
# sentencepiece skips training sentences longer than this many bytes (its max_sentence_length
# default); a corpus of long lines (JSONL paragraphs, minified text) would leave it nothing,
# so longer lines are cut into pieces of at most this size, at spaces where there are any.
MAX_SENTENCE_BYTES = 4192
# Both fixed so that every host that trains on the same text gets the same model bytes
# (the thread count is recorded in the model, though it does not change the pieces).
TRAINING_SEED = 1234
TRAINING_THREADS = 8


def train_tokenizer(
    input_files: list[Path],
    model_prefix: Path,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 1.0,
    normalization: str = "identity",
) -> Path:
    """Trains a tokenizer on text files (one sentence per line); returns the .model path.

    ``model_type`` ``bpe`` / ``unigram`` train sentencepiece; ``byte_bpe`` trains GPT-2's
    byte-level BPE with ``tokenizers`` (:func:`flaxlm.tokenizers.hf.train_hf_tokenizer`; the
    sentencepiece options do not apply), whose ``.model`` file holds flaxlm's JSON of it.
    Either way the specials are at ids 0..6.

    ``character_coverage`` is the share of the training text's characters that get their own
    piece (1.0 = all; 0.9995 is sentencepiece's advice for CJK, leaving rare characters to
    byte fallback). ``normalization="identity"`` keeps text exactly; ``nfkc`` / ``nmt_nfkc`` /
    ``nfkc_cf`` also collapse whitespace and add a dummy prefix, as sentencepiece does by
    default (lossy round trips).

    Writes ``<model_prefix>.model`` and ``<model_prefix>.vocab`` (piece, score per line), each
    under a temporary name renamed into place, so a failure leaves no half-written model. The
    same text gives the same model bytes on any machine. ``vocab_size`` is an upper bound: a
    corpus too small to fill it gets a smaller vocabulary.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization={normalization!r} is not one of {', '.join(NORMALIZATIONS)}"
        )
    if model_type in HF_MODEL_TYPES:
        return _train_hf(input_files, Path(model_prefix), vocab_size, model_type, normalization)
    exact = normalization == "identity"
    model_prefix = Path(model_prefix)
    proto = io.BytesIO()
    spm.set_random_generator_seed(TRAINING_SEED)
    spm.set_min_log_level(2)  # sentencepiece logs every EM step to stderr otherwise
    try:
        # Lines come from an iterator and the model from a writer, so no file name or temp path
        # is recorded in the model (sentencepiece stores its input/model_prefix arguments).
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(input_files),
            model_writer=proto,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=list(SPECIAL_TOKENS[CLS_ID:]),
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            # Exact round trips: no NFKC, keep runs of spaces, no invented leading space.
            normalization_rule_name=normalization,
            remove_extra_whitespaces=not exact,
            add_dummy_prefix=not exact,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            hard_vocab_limit=False,  # tiny corpora get a smaller vocab instead of an error
            input_sentence_size=MAX_TRAINING_SENTENCES,
            shuffle_input_sentence=True,
            train_extremely_large_corpus=False,
            num_threads=TRAINING_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise _training_error(e, vocab_size, input_files) from e
    return _write_model(model_prefix, proto.getvalue())


def _training_error(e: RuntimeError, vocab_size: int, input_files: list[Path]) -> ValueError:
    """sentencepiece's messages are long C++ asserts: the useful last part, in one line."""
    lines = str(e).strip().splitlines()
    detail = lines[0].split("] ")[-1].strip() if lines else ""
    if not detail:
        detail = (
            f"sentencepiece gave no reason ({type(e).__name__}); check that "
            f"{', '.join(str(p) for p in input_files[:3])} hold UTF-8 text lines"
        )
    return ValueError(f"sentencepiece training with vocab_size={vocab_size} failed: {detail}")


def _write_model(model_prefix: Path, model_bytes: bytes) -> Path:
    """Writes ``<model_prefix>.model`` and its ``.vocab`` (piece, score per line), each
    atomically; returns the .model path."""
    tokenizer = SentencePieceTokenizer.from_bytes(model_bytes)
    vocab = "".join(
        f"{tokenizer.id_to_piece(i)}\t{tokenizer.score(i):g}\n" for i in range(tokenizer.vocab_size)
    )
    model_path = model_prefix.with_name(model_prefix.name + ".model")
    _write_atomic(model_path, model_bytes)
    _write_atomic(model_prefix.with_name(model_prefix.name + ".vocab"), vocab.encode("utf-8"))
    return model_path


def _train_hf(
    input_files: list[Path], model_prefix: Path, vocab_size: int, model_type: str, norm: str
) -> Path:
    """:func:`train_tokenizer` for the HF types: ``<prefix>.model`` holds the tokenizer's
    bytes (flaxlm's JSON, what a run stores), ``<prefix>.vocab`` one token per line."""
    if norm != "identity":
        raise ValueError(
            f"normalization={norm!r} applies to sentencepiece types; expected identity for "
            f"model_type={model_type!r}"
        )
    lines = itertools.islice(_lines(input_files), MAX_TRAINING_SENTENCES)
    tokenizer = train_hf_tokenizer(lines, vocab_size, model_type)
    vocab = "".join(f"{tokenizer.id_to_piece(i)}\n" for i in range(tokenizer.vocab_size))
    model_path = model_prefix.with_name(model_prefix.name + ".model")
    _write_atomic(model_path, tokenizer.model_bytes)
    _write_atomic(model_prefix.with_name(model_prefix.name + ".vocab"), vocab.encode("utf-8"))
    return model_path


def _lines(files: list[Path]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield from split_long_line(line.rstrip("\n"))


def split_long_line(line: str, limit: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """``line`` in pieces of at most ``limit`` UTF-8 bytes, cut after a space where one is
    near (a word longer than the limit is cut inside); a short line is yielded whole."""
    while len(line.encode("utf-8")) > limit:
        head = line.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
        cut = head.rfind(" ") + 1
        if cut < len(head) // 2:  # no space in the second half: cut inside the word
            cut = len(head)
        yield line[:cut]
        line = line[cut:]
    yield line


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class SentencePieceTokenizer(Tokenizer):
    """A loaded sentencepiece model plus the ids of the special tokens (pad, unk, bos and
    eos are required; map missing ones with :func:`map_special_tokens`)."""

    def __init__(self, processor: spm.SentencePieceProcessor, source: str = "<bytes>"):
        self._sp = processor
        self.source = source
        self.vocab_size = processor.get_piece_size()
        ids = {
            "pad": processor.pad_id(),
            "unk": processor.unk_id(),
            "bos": processor.bos_id(),
            "eos": processor.eos_id(),
        }
        missing = [name for name, i in ids.items() if i < 0]
        if missing:
            raise missing_specials_error(
                source, missing, "pad, unk, bos and eos ids", "a control piece"
            )
        self.pad_id = ids["pad"]
        self.unk_id = ids["unk"]
        self.bos_id = ids["bos"]
        self.eos_id = ids["eos"]
        self.cls_id = self._piece_id("[CLS]")
        self.sep_id = self._piece_id("[SEP]")
        self.mask_id = self._piece_id("[MASK]")

    @classmethod
    def reads(cls, data: bytes | None) -> bool:
        """Any file that is not JSON (a sentencepiece model proto, or an error to report)."""
        return data is not None and not is_json(data)

    @classmethod
    def load(
        cls, path: str | Path, specials: dict[str, str] | None = None
    ) -> SentencePieceTokenizer:
        """Loads a ``.model`` file, mapping missing specials (see the module doc)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {str(path)!r} does not exist")
        data = path.read_bytes()
        if specials:
            data = map_special_tokens(data, specials, source=str(path))
        return cls.from_bytes(data, source=str(path))

    @classmethod
    def from_bytes(cls, model_bytes: bytes, source: str = "<bytes>") -> SentencePieceTokenizer:
        """Loads a serialized sentencepiece model (as stored in checkpoints)."""
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"tokenizer {source} is not a sentencepiece model: {e}") from e
        return cls(processor, source)

    @property
    def model_bytes(self) -> bytes:
        """The serialized ``.model``."""
        return self._sp.serialized_model_proto()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no bos/eos are added."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, encoded on all cores."""
        return self._sp.encode(list(texts), out_type=int, num_threads=os.cpu_count() or 1)

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``; special tokens decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        """The piece of id ``i`` (spaces shown as ``▁``)."""
        return self._sp.id_to_piece(int(i))

    def word_starts(self) -> np.ndarray:
        """(vocab_size,) bool: pieces that begin with ``▁`` (a space)."""
        pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        return np.array([p.startswith(WORD_START) for p in pieces], dtype=bool)

    def score(self, i: int) -> float:
        """The piece's score in the model (BPE: merge priority; unigram: log-probability)."""
        return self._sp.get_score(int(i))

    def _piece_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        # piece_to_id answers unk for pieces it does not know.
        return i if self._sp.id_to_piece(i) == piece else None


def map_special_tokens(
    model_bytes: bytes, specials: dict[str, str], source: str = "<bytes>"
) -> bytes:
    """The model with ``specials`` (role -> piece) written into it; ValueError if one cannot be.

    A role maps to an existing *control* piece (never produced from text), or to its standard
    piece (``SPECIAL_ROLES``), which is appended as a new control piece when the model lacks it.
    pad/bos/eos point sentencepiece at the piece (several roles may share one, e.g. pad = eos);
    cls/sep/mask rename the control piece to ``[CLS]``/``[SEP]``/``[MASK]``, the names flaxlm
    looks up. Pieces that are text (ordinary, byte, unknown, user-defined) are refused: mapping
    one would make the role ambiguous with real text.
    """
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as e:  # protobuf's DecodeError
        raise ValueError(f"tokenizer {source} is not a sentencepiece model: {e}") from e
    control = model_pb2.ModelProto.SentencePiece.CONTROL
    spec = proto.trainer_spec
    for role, piece in specials.items():
        where = f"tokenizer {source}: data.tokenizer_specials.{role}={piece!r}"
        if role not in SPECIAL_ROLES:
            raise ValueError(f"{where}: unknown role; expected one of {', '.join(SPECIAL_ROLES)}")
        ids = {p.piece: i for i, p in enumerate(proto.pieces)}
        i = ids.get(piece)
        if i is None:
            if piece != SPECIAL_ROLES[role]:
                raise ValueError(
                    f"{where}: no such piece; expected an existing control piece or "
                    f"{SPECIAL_ROLES[role]!r} to append one"
                )
            i = len(proto.pieces)
            proto.pieces.add(piece=piece, score=0.0, type=control)
        kind = model_pb2.ModelProto.SentencePiece.Type.Name(proto.pieces[i].type)
        if proto.pieces[i].type != control:
            raise ValueError(
                f"{where}: piece id {i} has type {kind}, not CONTROL; expected a control piece "
                f"or {SPECIAL_ROLES[role]!r} to append one"
            )
        if role in ("pad", "bos", "eos"):
            setattr(spec, f"{role}_piece", piece)
            setattr(spec, f"{role}_id", i)
            continue
        target = SPECIAL_ROLES[role]
        held = {getattr(spec, f"{r}_piece") for r in ("pad", "bos", "eos")}
        if piece != target and (piece in held or target in ids):
            raise ValueError(
                f"{where}: cannot rename piece id {i} to {target!r} (it serves another role or "
                f"{target!r} exists); expected a free control piece"
            )
        proto.pieces[i].piece = target
    return proto.SerializeToString()


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises ConfigError when the model's embedding table cannot hold every token id."""
    if model_vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's vocab size "
            f"{tokenizer.vocab_size} ({tokenizer.source}); set model.vocab_size >= "
            f"{tokenizer.vocab_size}"
        )
