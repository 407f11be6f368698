"""HuggingFace interop: flaxlm BERT <-> transformers BertForPreTraining, logits equal in fp32.

Needs the ``hf`` extra (transformers + torch CPU); ``make test`` installs it.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import noisy_params
from hf_tokenizers import PROBES, bert_tokenizer_dir

from flaxlm.cli import main
from flaxlm.config import Config, ModelConfig
from flaxlm.models import BERT
from flaxlm.tools.convert import ConversionError, export_hf, import_hf
from flaxlm.tools.load import load_checkpoint, save_params_checkpoint

HF_MISSING = "the hf extra is not installed: pip install -e '.[hf]' (make install-dev does)"
torch = pytest.importorskip("torch", reason=HF_MISSING)
transformers = pytest.importorskip("transformers", reason=HF_MISSING)
safetensors_numpy = pytest.importorskip("safetensors.numpy", reason=HF_MISSING)

V, L = 384, 40  # byte fallback alone takes 256 + 7 pieces


def tiny_bert(**overrides) -> ModelConfig:
    """A 2-layer original-BERT (post-LN, exact GELU) small enough to run in a blink."""
    base = ModelConfig(
        family="bert", norm_placement="post", activation="gelu_exact", norm_eps=1e-12,
        vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=80, max_seq_len=L,
    )  # fmt: skip
    return dataclasses.replace(base, **overrides)


def pair_batch(type_vocab_size: int = 2, seed: int = 0):
    """Two rows: a full-length sentence pair, and a shorter one padded from position 27.

    Returns (tokens_BxL, types_BxL, mask_BxL); mask 1 = real token, 0 = padding.
    """
    tokens_BxL = np.random.default_rng(seed).integers(0, V, (2, L))
    types_BxL = np.zeros((2, L), np.int64)
    types_BxL[0, 15:] = 1
    types_BxL[1, 10:27] = type_vocab_size - 1  # the last type id exists too
    mask_BxL = np.ones((2, L), np.int64)
    mask_BxL[1, 27:] = 0
    tokens_BxL[1, 27:] = 0  # <pad>
    types_BxL[1, 27:] = 0
    return tokens_BxL, types_BxL, mask_BxL


def torch_outputs(model, tokens_BxL, types_BxL, mask_BxL) -> tuple[np.ndarray, np.ndarray]:
    """transformers' (prediction_logits_BxLxV, seq_relationship_logits_Bx2)."""
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens_BxL),
            token_type_ids=torch.tensor(types_BxL),
            attention_mask=torch.tensor(mask_BxL),
        )
    return out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()


def flax_outputs(cfg, params, tokens_BxL, types_BxL, mask_BxL) -> tuple[np.ndarray, np.ndarray]:
    """flaxlm's (mlm_logits_BxLxV over every position, nsp_logits_Bx2). Padding is segment 0,
    so real tokens attend only to real tokens, as under HF's attention mask."""
    apply = jax.jit(BERT(cfg).apply)
    out = apply(
        {"params": params},
        jnp.asarray(tokens_BxL),
        segment_ids_BxL=jnp.asarray(mask_BxL),
        token_types_BxL=jnp.asarray(types_BxL),
    )
    return np.asarray(out["mlm_logits"]), np.asarray(out["nsp_logits"])


def max_diffs(hf_model, cfg, params, type_vocab_size=2, seed=0) -> tuple[float, float]:
    """Max |HF - flaxlm| of the MLM logits (at every real token) and of the NSP logits."""
    batch = pair_batch(type_vocab_size, seed)
    hf_mlm_BxLxV, hf_nsp_Bx2 = torch_outputs(hf_model, *batch)
    mlm_BxLxV, nsp_Bx2 = flax_outputs(cfg, params, *batch)
    assert mlm_BxLxV.shape == hf_mlm_BxLxV.shape == (2, L, cfg.vocab_size)
    # Padded queries differ by design (HF lets them see real tokens; flaxlm only padding);
    # nothing reads their logits.
    real_BxL = batch[2].astype(bool)
    mlm = np.abs(hf_mlm_BxLxV - mlm_BxLxV)[real_BxL].max()
    return float(mlm), float(np.abs(hf_nsp_Bx2 - nsp_Bx2).max())


def assert_same_params(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


EXPORTABLE = {
    "bert": {},
    "sinusoidal-gelu-tanh": {"positions": "sinusoidal", "activation": "gelu"},
    "no-bias-relu-3-types": {"use_bias": False, "activation": "relu", "type_vocab_size": 3},
}


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_gives_transformers_the_same_logits_and_imports_back_bit_identical(name, tmp_path):
    cfg = tiny_bert(**EXPORTABLE[name])
    params = noisy_params(cfg)
    export_hf(cfg, params, tmp_path)
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
    mlm, nsp = max_diffs(hf, cfg, params, cfg.type_vocab_size)
    assert mlm <= 1e-4 and nsp <= 1e-4, f"max abs diff mlm {mlm}, nsp {nsp}"

    back_cfg, back = import_hf(tmp_path)
    assert back_cfg == cfg
    assert_same_params(params, back)


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_a_random_transformers_bert_imports_with_the_same_logits(hidden_act, tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=80, max_position_embeddings=L, hidden_act=hidden_act,
    )  # fmt: skip
    hf = transformers.BertForPreTraining(config).eval()
    with torch.no_grad():  # BERT inits biases and norms to constants; make them matter
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    cfg, params = import_hf(tmp_path)
    expected = ("bert", "post", "learned", {"gelu": "gelu_exact", "gelu_new": "gelu"}[hidden_act])
    assert (cfg.family, cfg.norm_placement, cfg.positions, cfg.activation) == expected
    assert (cfg.d_ff, cfg.norm_eps, cfg.type_vocab_size) == (80, 1e-12, 2)
    mlm, nsp = max_diffs(hf, cfg, params, seed=1)
    assert mlm <= 1e-4 and nsp <= 1e-4, f"max abs diff mlm {mlm}, nsp {nsp}"

    # The same weights without the "bert." prefix (and old gamma/beta names) import the same.
    tensors = safetensors_numpy.load_file(str(tmp_path / "model.safetensors"))
    renamed = {
        k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma"): v
        for k, v in tensors.items()
    }
    safetensors_numpy.save_file(renamed, str(tmp_path / "model.safetensors"))
    assert_same_params(params, import_hf(tmp_path)[1])


def test_unsupported_options_are_refused_with_the_option_named(tmp_path):
    params = noisy_params(tiny_bert())
    for option, bad in [("norm_placement", "pre"), ("positions", "rope")]:
        with pytest.raises(ConversionError, match=f"model.{option}='{bad}' cannot be expressed"):
            export_hf(tiny_bert(**{option: bad}), params, tmp_path / "refused")
    with pytest.raises(ConversionError, match="model.n_kv_heads=1 .* cannot be expressed"):
        export_hf(tiny_bert(n_kv_heads=1), params, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    export_hf(tiny_bert(), params, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["flaxlm_model"]
    for key, value in [
        ("position_embedding_type", "relative_key"),
        ("is_decoder", True),
        ("add_cross_attention", True),
        ("tie_word_embeddings", False),
        ("hidden_act", "swish"),
        ("model_type", "roberta"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConversionError, match=key):
            import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": V + 1}))
    with pytest.raises(ConversionError, match=r"has shape \(384,.*config.json needs \(385,"):
        import_hf(tmp_path)


def test_a_bert_without_pretraining_heads_is_refused_naming_the_missing_tensor(tmp_path):
    config = transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=L,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(tmp_path)  # encoder + pooler only
    with pytest.raises(ConversionError, match="no tensor 'cls.predictions.transform.dense"):
        import_hf(tmp_path)


def test_convert_commands_round_trip_a_bert_checkpoint(tmp_path, tiny_tokenizer, capsys):
    cfg = Config(model=tiny_bert(vocab_size=tiny_tokenizer.vocab_size))
    cfg.data.seq_len = 32
    params = noisy_params(cfg.model)
    save_params_checkpoint(tmp_path / "run", cfg, params, tiny_tokenizer, step=7)

    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tiny_tokenizer.model_bytes
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    assert max(max_diffs(hf, cfg.model, params)) <= 1e-4
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    loaded = load_checkpoint(tmp_path / "back")
    assert loaded.cfg.model == cfg.model
    assert loaded.cfg.data.seq_len == L  # min(max_position_embeddings, 1024)
    assert_same_params(params, loaded.params)

    pre = tmp_path / "pre"
    cfg.model = tiny_bert(vocab_size=tiny_tokenizer.vocab_size, norm_placement="pre")
    save_params_checkpoint(pre, cfg, noisy_params(cfg.model), tiny_tokenizer)
    assert main(["convert", "to-hf", str(pre), str(tmp_path / "hf2")]) == 2
    assert "model.norm_placement='pre' cannot be expressed" in capsys.readouterr().err


def test_from_hf_makes_a_run_of_a_transformers_bert_with_a_given_tokenizer(
    tmp_path, tiny_tokenizer
):
    config = transformers.BertConfig(
        vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertForPreTraining(config).save_pretrained(tmp_path / "hf")
    tok = tmp_path / "tok.model"
    tok.write_bytes(tiny_tokenizer.model_bytes)
    argv = ["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "run")]
    assert main([*argv, "--tokenizer", str(tok), "--seq-len", "32"]) == 0
    loaded = load_checkpoint(tmp_path / "run")
    assert (loaded.cfg.model.family, loaded.cfg.model.max_seq_len) == ("bert", 64)
    assert loaded.cfg.data.seq_len == 32


def test_a_transformers_bert_imports_and_exports_with_its_wordpiece_tokenizer(tmp_path):
    hf_dir = bert_tokenizer_dir(tmp_path / "hf", vocab_size=V)
    config = transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertForPreTraining(config).save_pretrained(hf_dir)
    assert main(["convert", "from-hf", str(hf_dir), str(tmp_path / "run")]) == 0
    tok = load_checkpoint(tmp_path / "run").tokenizer
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in PROBES:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False)
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id) == (
        reference.cls_token_id, reference.sep_token_id, reference.mask_token_id,
        reference.pad_token_id,
    )  # fmt: skip
    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert exported.mask_token_id == tok.mask_id
    for text in PROBES:
        assert exported.encode(text, add_special_tokens=False) == tok.encode(text)


@pytest.fixture(scope="module")
def tiny_tokenizer(small_corpus, tmp_path_factory):
    from flaxlm.tokenizers.sentencepiece import Tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    return Tokenizer.load(train_tokenizer(sorted(small_corpus.iterdir())[:2], out, V))
