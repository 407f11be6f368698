"""The tools' outputs on a bucket (moto's S3 server on 127.0.0.1): ``convert from-hf`` writes a
run dir into a bucket, and ``convert to-hf`` reads it and writes an HF directory there
(``config.json`` last) equal to the export of the original weights into a folder."""

from __future__ import annotations

import jax
import numpy as np
import object_stores
import pytest
from flax import linen as nn

from flaxlm import storage
from flaxlm.cli import main
from flaxlm.config import Config, ModelConfig
from flaxlm.families import build_model
from flaxlm.tools.convert import export_hf
from flaxlm.tools.load import save_params_checkpoint

s3_server = object_stores.s3_server


@pytest.fixture(scope="module")
def tokenizer(small_corpus, tmp_path_factory):
    from flaxlm.tokenizers.sentencepiece import Tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    return Tokenizer.load(train_tokenizer(sorted(small_corpus.iterdir())[:2], out, 384))


def test_convert_writes_run_dirs_and_hf_directories_into_a_bucket(
    s3_server, tokenizer, tmp_path, monkeypatch
):
    pytest.importorskip("safetensors")
    monkeypatch.setenv("FLAXLM_CACHE", str(tmp_path / "host"))
    bucket = object_stores.make_bucket("s3")
    cfg = Config(model=ModelConfig(vocab_size=384, d_model=32, n_layers=2, n_heads=4, d_ff=80))
    cfg.data.seq_len = 32
    tokens_1x8 = jax.numpy.zeros((1, 8), jax.numpy.int32)
    init = jax.jit(build_model(cfg.model).init)  # jitted: seconds, not tens of seconds
    params = nn.meta.unbox(init(jax.random.key(0), tokens_1x8))["params"]
    # from-hf's writer: a run dir with checkpoint 0, config.yaml and tokenizer.model
    save_params_checkpoint(f"{bucket}/run", cfg, params, tokenizer)
    assert storage.read_bytes(f"{bucket}/run/tokenizer.model") == tokenizer.model_bytes
    # to-hf, on another host, from the bucket run into the bucket: the files export_hf writes
    # from the original parameters into a folder
    monkeypatch.setenv("FLAXLM_CACHE", str(tmp_path / "another-host"))
    assert main(["convert", "to-hf", f"{bucket}/run", f"{bucket}/hf"]) == 0
    export_hf(cfg.model, params, tmp_path / "hf", tokenizer, cfg.data.seq_len)
    there = storage.walk(f"{bucket}/hf")
    assert sorted(there) == sorted(storage.walk(str(tmp_path / "hf")))
    for rel in there:
        assert storage.read_bytes(f"{bucket}/hf/{rel}") == (tmp_path / "hf" / rel).read_bytes()


def test_finetune_output_goes_to_a_bucket_and_loads_on_another_host(
    s3_server, tokenizer, tmp_path, monkeypatch
):
    from types import SimpleNamespace

    from flaxlm.tools.finetune import FinetuneOptions, load_classifier, save_classifier

    monkeypatch.setenv("FLAXLM_CACHE", str(tmp_path / "host"))
    out = object_stores.make_bucket("s3") + "/run/finetune"
    params = {"classifier": {"kernel": np.arange(12.0).reshape(4, 3), "bias": np.ones(3)}}
    base = SimpleNamespace(cfg=Config(), step=5, tokenizer=tokenizer)
    keys = []
    store_type = type(storage.store_of(out)[0])
    write = store_type.write
    monkeypatch.setattr(store_type, "write", lambda s, k, d: keys.append(k) or write(s, k, d))
    assert save_classifier(out, params, base, ["a", "b", "c"], FinetuneOptions(), {}) == out
    monkeypatch.undo()
    assert keys[-1].endswith("finetune/classifier.json")  # the seal, after the weights
    monkeypatch.setenv("FLAXLM_CACHE", str(tmp_path / "another-host"))
    _, loaded, labels, tok = load_classifier(out)
    assert labels == ["a", "b", "c"] and tok.model_bytes == tokenizer.model_bytes
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(loaded["classifier"][name], params["classifier"][name])
