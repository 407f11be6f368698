"""A flaxlm tokenizer as HuggingFace tokenizer files, so ``AutoTokenizer.from_pretrained(OUT)``
loads it and encodes text to the same ids.

    files = write_tokenizer_files(tokenizer, out_dir, model_max_length=1024)

An HF tokenizer is written back as it came (``tokenizer.json``). A sentencepiece BPE model
becomes a ``tokenizers`` BPE with the same ids: its vocabulary as is, merges ranked by the score
of the piece they make (the order sentencepiece merges in), byte fallback, and the model's own
whitespace handling as normalizer (spaces as ``▁``; dummy prefix, collapsed whitespace and a
precompiled NFKC map only where the model has them). Its user-defined pieces (``[CLS]``
``[SEP]`` ``[MASK]``) are added tokens, matched in text as sentencepiece does; control pieces
(``<pad>`` ``<s>`` ...) are never merged into, so text never yields them. A sentencepiece
*unigram* model is not written as ``tokenizer.json``: ``tokenizers``' Viterbi picks control
pieces and breaks ties otherwise, so its ids would differ; ``tokenizer.model`` is still written.

``tokenizer_config.json`` names the special tokens (``bos_token``, ``pad_token``, ...), so
``from-hf`` of the written directory gives back the same roles.
"""

from __future__ import annotations

import json
from pathlib import Path

from flaxlm.tokenizers.hf import TOKENIZER_JSON
from flaxlm.tokenizers.sentencepiece import HFTokenizer, SentencePieceTokenizer, Tokenizer

SPM_FILE = "tokenizer.model"
SPACE = "\u2581"


def tokenizer_roles(tokenizer: Tokenizer) -> dict[str, str]:
    """Role -> token text for each special role the tokenizer has."""
    if isinstance(tokenizer, HFTokenizer):
        return dict(tokenizer.specials)
    ids = tokenizer.special_ids()
    return {r: tokenizer.id_to_piece(i) for r, i in ids.items() if i is not None}


def write_tokenizer_files(
    tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int | None = None
) -> list[str]:
    """Writes the tokenizer into ``out_dir`` as HF files; returns the names written.

    A sentencepiece tokenizer also keeps its ``tokenizer.model`` (from-hf reads it back
    bit-identical); a unigram one gets only that (module doc)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if isinstance(tokenizer, SentencePieceTokenizer):
        (out / SPM_FILE).write_bytes(tokenizer.model_bytes)
        written.append(SPM_FILE)
        tokenizer_json = sentencepiece_tokenizer_json(tokenizer.model_bytes)
        if tokenizer_json is None:
            return written
    elif isinstance(tokenizer, HFTokenizer):
        tokenizer_json = tokenizer.tokenizer_json
    else:
        raise TypeError(f"cannot write a {type(tokenizer).__name__} as HF tokenizer files")
    (out / TOKENIZER_JSON).write_text(tokenizer_json, encoding="utf-8")
    specials = {f"{role}_token": token for role, token in tokenizer_roles(tokenizer).items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    if model_max_length:
        config["model_max_length"] = model_max_length
    for name, doc in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        (out / name).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return [*written, TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json"]


def sentencepiece_tokenizer_json(model_bytes: bytes) -> str | None:
    """The ``tokenizer.json`` of a sentencepiece BPE model, encoding text to the same ids;
    None for a unigram model (module doc)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    from tokenizers import AddedToken, Regex, decoders, models, normalizers
    from tokenizers import Tokenizer as HFBackend

    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    piece_type = model_pb2.ModelProto.SentencePiece
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
        return None
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece for p in pieces if p.type == piece_type.NORMAL}
    # sentencepiece merges the adjacent pair whose joined piece scores highest; as a ranked
    # merge list: every split of every normal piece into two normal pieces, best score first.
    ranked = []
    for i, p in enumerate(pieces):
        if p.type != piece_type.NORMAL:
            continue
        for k in range(1, len(p.piece)):
            a, b = p.piece[:k], p.piece[k:]
            if a in normal and b in normal:
                ranked.append((-p.score, i, vocab[a], vocab[b], a, b))
    ranked.sort()
    unk = pieces[proto.trainer_spec.unk_id].piece
    model = models.BPE(
        vocab=vocab,
        merges=[(a, b) for *_, a, b in ranked],
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
    )
    backend = HFBackend(model)
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [
            normalizers.Strip(left=True, right=True),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    decode_steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode_steps)
    user = [p.piece for p in pieces if p.type == piece_type.USER_DEFINED]
    backend.add_special_tokens([AddedToken(u, special=True, normalized=False) for u in user])
    return backend.to_str()


def load_hf_dir_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The tokenizer of an HF directory, None when it has none: its ``tokenizer.model`` when
    that loads with flaxlm's specials (what ``write_tokenizer_files`` writes; read back
    bit-identical), else its ``tokenizer.json`` / vocab files (an HF model's own tokenizer;
    a Llama-style ``tokenizer.model`` without a pad token comes here too)."""
    folder = Path(folder)
    has_hf = any((folder / n).is_file() for n in (TOKENIZER_JSON, "vocab.txt", "vocab.json"))
    if (folder / SPM_FILE).is_file():
        try:
            return Tokenizer.load(folder / SPM_FILE)
        except ValueError:
            if not has_hf:
                raise
    return HFTokenizer.load(folder) if has_hf else None
