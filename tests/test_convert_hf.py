"""HuggingFace interop: flaxlm GPT <-> transformers GPT2LMHeadModel, logits equal in fp32.

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
from hf_tokenizers import PROBES, gpt2_tokenizer_dir

from flaxlm.cli import main
from flaxlm.config import Config, ModelConfig
from flaxlm.models import GPT
from flaxlm.tools.convert import ConversionError, export_hf, import_hf
from flaxlm.tools.load import load_checkpoint, save_params_checkpoint

HF_MISSING = "the hf extra is not installed: pip install -e '.[hf]' (make install-dev does)"
torch = pytest.importorskip("torch", reason=HF_MISSING)
transformers = pytest.importorskip("transformers", reason=HF_MISSING)

V = 384  # byte fallback alone takes 256 + 7 pieces


def tiny(**overrides) -> ModelConfig:
    base = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=80, max_seq_len=40)
    return dataclasses.replace(base, **overrides)


def random_tokens(shape=(2, 40), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, shape)


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def flax_logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(GPT(cfg).apply)({"params": params}, jnp.asarray(tokens)))


EXPORTABLE = {
    "gpt2": {},
    "untied-relu": {"tie_embeddings": False, "activation": "relu"},
    "sinusoidal-gelu-exact": {"positions": "sinusoidal", "activation": "gelu_exact"},
    "no-bias": {"use_bias": False},
    "scanned-layers": {"scan_layers": True},
}


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_gives_transformers_the_same_logits_and_imports_back_bit_identical(name, tmp_path):
    cfg = tiny(**EXPORTABLE[name])
    params = noisy_params(cfg)
    export_hf(cfg, params, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = random_tokens()
    diff = np.abs(torch_logits(hf, tokens) - flax_logits(cfg, params, tokens)).max()
    assert diff <= 1e-4, f"max abs diff {diff}"

    back_cfg, back = import_hf(tmp_path)
    assert back_cfg == cfg
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_random_transformers_gpt2_imports_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=40, n_embd=32, n_layer=2, n_head=4, activation_function="gelu_new"
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2 inits biases and norms to constants; make them matter
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    cfg, params = import_hf(tmp_path)
    assert (cfg.d_model, cfg.d_ff, cfg.activation, cfg.tie_embeddings) == (32, 128, "gelu", True)
    tokens = random_tokens(seed=1)
    diff = np.abs(torch_logits(hf, tokens) - flax_logits(cfg, params, tokens)).max()
    assert diff <= 1e-4, f"max abs diff {diff}"


def test_a_transformers_gpt2_imports_and_exports_with_its_own_tokenizer(tmp_path):
    """A GPT-2 directory with a byte-level BPE tokenizer.json: the imported run encodes like
    AutoTokenizer, generates through it, and to-hf writes the same tokenizer back."""
    from flaxlm.tools.generate import GenerateOptions, generate_for

    hf_dir = gpt2_tokenizer_dir(tmp_path / "hf", vocab_size=V)
    config = transformers.GPT2Config(vocab_size=V, n_positions=40, n_embd=32, n_layer=1, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
    assert main(["convert", "from-hf", str(hf_dir), str(tmp_path / "run")]) == 0
    loaded = load_checkpoint(tmp_path / "run")
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in PROBES:
        assert loaded.tokenizer.encode(text) == reference.encode(text, add_special_tokens=False)
    end = reference.convert_tokens_to_ids("<|endoftext|>")
    assert (loaded.tokenizer.eos_id, loaded.tokenizer.pad_id) == (end, end)
    prompt = loaded.tokenizer.encode(" To be, or not")
    new_ids = generate_for(loaded, [prompt], GenerateOptions(max_new_tokens=3)).ids[0]
    assert loaded.tokenizer.decode(new_ids) == reference.decode(new_ids, skip_special_tokens=True)

    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in PROBES:
        assert exported.encode(text, add_special_tokens=False) == loaded.tokenizer.encode(text)
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (hf_config["eos_token_id"], hf_config["pad_token_id"]) == (end, end)
    assert main(["convert", "from-hf", str(tmp_path / "out"), str(tmp_path / "back")]) == 0
    back = load_checkpoint(tmp_path / "back")
    assert back.tokenizer.model_bytes == loaded.tokenizer.model_bytes


def test_unsupported_options_are_refused_with_the_option_named(tmp_path):
    with pytest.raises(ConversionError, match="model.positions='rope'"):
        export_hf(tiny(positions="rope"), noisy_params(tiny(positions="rope")), tmp_path)
    export_hf(tiny(), noisy_params(tiny()), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["flaxlm_model"]
    for key, value in [
        ("scale_attn_by_inverse_layer_idx", True),
        ("activation_function", "swish"),
        ("model_type", "mistral"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConversionError, match=key):
            import_hf(tmp_path)


def test_convert_commands_round_trip_a_checkpoint(tmp_path, tiny_tokenizer, capsys):
    cfg = Config(model=tiny(vocab_size=tiny_tokenizer.vocab_size))
    cfg.data.seq_len = 32
    params = noisy_params(cfg.model)
    save_params_checkpoint(tmp_path / "run", cfg, params, tiny_tokenizer, step=7)

    assert main(["convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tiny_tokenizer.model_bytes
    # transformers reads the sentencepiece run's tokenizer as tokenizer.json, with its ids.
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in PROBES:
        assert exported.encode(text, add_special_tokens=False) == tiny_tokenizer.encode(text)
    assert (
        exported.pad_token_id
        == tiny_tokenizer.pad_id
        == transformers.AutoConfig.from_pretrained(tmp_path / "hf").pad_token_id
    )
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    loaded = load_checkpoint(tmp_path / "back")
    assert loaded.cfg.model == cfg.model
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    rope = tmp_path / "rope"
    cfg.model = tiny(vocab_size=tiny_tokenizer.vocab_size, positions="rope")
    save_params_checkpoint(rope, cfg, noisy_params(cfg.model), tiny_tokenizer)
    assert main(["convert", "to-hf", str(rope), str(tmp_path / "hf2")]) == 2
    assert "model.positions='rope' cannot be expressed" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_tokenizer(small_corpus, tmp_path_factory):
    from flaxlm.tokenizers.sentencepiece import Tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    return Tokenizer.load(train_tokenizer(sorted(small_corpus.iterdir())[:2], out, V))


def test_grouped_query_attention_is_refused_with_the_option_named(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64, n_kv_heads=2)
    params = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    with pytest.raises(ConversionError, match="model.n_kv_heads=2 .* cannot be expressed by GPT-2"):
        export_hf(cfg, params, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
