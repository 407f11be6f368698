"""A prepared corpus in a bucket (an S3 server and a GCS emulator on 127.0.0.1): opened without
downloading it, each host's batches read by byte ranges — only its own rows — and equal to the
batches of the same corpus on a local disk; ``verify`` checks it in place."""

from __future__ import annotations

import numpy as np
import object_stores
import pytest
from conftest import REPO

from flaxlm import storage
from flaxlm.config import load_config
from flaxlm.data import prepare_data
from flaxlm.data.batch_ramp import BatchRamp
from flaxlm.data.prepare import prepare_corpus
from flaxlm.data.prepared_reader import verify_prepared
from flaxlm.families import family_of

# the servers' fixtures (tests/object_stores.py)
bucket, s3_server, gcs_server = (
    object_stores.bucket,
    object_stores.s3_server,
    object_stores.gcs_server,
)


def _config(*overrides):
    return load_config(REPO / "configs" / "gpt_tiny.yaml", list(overrides))


@pytest.fixture(scope="module")
def local_corpus(small_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepared")
    cfg = _config(
        f"data.paths=[{small_corpus}]", f"data.cache_dir={tmp / 'cache'}", "data.val_fraction=0.34"
    )
    prepare_corpus(cfg, tmp / "corpus", workers=1, progress=False)
    return tmp / "corpus"


def _batches(prepared: str):
    cfg = _config(f"data.prepared={prepared}", "train.batch_size=4")
    data = prepare_data(cfg.data)
    return data, family_of(cfg).train_batches(data, cfg, BatchRamp.from_config(cfg.train))


def test_a_corpus_in_a_bucket_is_read_by_ranges_host_by_host(bucket, local_corpus, monkeypatch):
    url = f"{bucket}/corpora/shakespeare"
    storage.upload_tree(local_corpus, url)
    store, _ = storage.store_of(url)
    read, original = [], type(store).read

    def counted(self, key, start=0, length=None):
        data = original(self, key, start, length)
        if key.endswith(".tokens.npy"):
            read.append((start, len(data)))
        return data

    monkeypatch.setattr(type(store), "read", counted)
    here, here_batches = _batches(url)
    assert read == []  # opening reads no token: the shards' sizes come from a listing
    _, there_batches = _batches(str(local_corpus))
    for step in (0, 3):
        for proc in (0, 1):  # two hosts, each its half of the rows
            got, expect = here_batches.batch(step, proc, 2), there_batches.batch(step, proc, 2)
            assert set(got) == set(expect)
            for key in got:
                np.testing.assert_array_equal(got[key], expect[key])
    shard_bytes = sum(
        size for rel, size in storage.walk(url).items() if rel.endswith(".tokens.npy")
    )
    headers = [n for start, n in read if start == 0]
    tokens = sum(n for start, n in read if start > 0)
    assert headers and max(headers) <= 256  # one small read per shard opened
    assert 0 < tokens < shard_bytes / 10  # the rows of the batches, not the shards
    assert verify_prepared(url, progress=False) == []
    monkeypatch.undo()
    shard = next(rel for rel in storage.walk(url) if rel.endswith("train.tokens.npy"))
    damaged = bytearray(storage.read_bytes(f"{url}/{shard}"))
    damaged[-1] ^= 1
    storage.write_bytes(f"{url}/{shard}", bytes(damaged))
    assert verify_prepared(url, progress=False) == [
        f"{url}/{shard}: SHA-256 differs from the manifest (corrupted)"
    ]


def test_a_missing_corpus_in_a_bucket_is_one_line_naming_it(bucket):
    from flaxlm.config import ConfigError

    with pytest.raises(ConfigError, match=f"data.prepared='{bucket}/nothing' holds no manifest"):
        _config(f"data.prepared={bucket}/nothing")


def _written_keys(monkeypatch, url: str) -> list[str]:
    """Records the keys written into ``url``'s store, in order."""
    store_type = type(storage.store_of(url)[0])
    keys, write, upload = [], store_type.write, store_type.upload_file

    def written(self, key, data):
        keys.append(key)
        return write(self, key, data)

    def uploaded(self, local_path, key):
        keys.append(key)
        return upload(self, local_path, key)

    monkeypatch.setattr(store_type, "write", written)
    monkeypatch.setattr(store_type, "upload_file", uploaded)
    return keys


def test_prepare_out_to_a_bucket_writes_the_manifest_last(
    s3_server, small_corpus, local_corpus, tmp_path, monkeypatch
):
    monkeypatch.setenv("FLAXLM_CACHE", str(tmp_path / "host"))
    url = object_stores.make_bucket("s3") + "/corpora/shakespeare"
    cfg = _config(
        f"data.paths=[{small_corpus}]", f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.34", f"data.tokenizer={local_corpus / 'tokenizer.model'}",
    )  # fmt: skip
    keys = _written_keys(monkeypatch, url)
    prepare_corpus(cfg, url, workers=1, progress=False)
    monkeypatch.undo()
    assert keys[-1].endswith("/manifest.json") and len(keys) > 10  # the seal, after the rest
    shards = [rel for rel in storage.walk(str(local_corpus)) if rel.endswith(".npy")]
    for rel in shards:  # the same tokens as the corpus prepared into a folder
        assert storage.read_bytes(f"{url}/{rel}") == (local_corpus / rel).read_bytes(), rel
    assert verify_prepared(url, progress=False) == []


def test_raw_sources_and_the_token_cache_in_a_bucket(
    s3_server, small_corpus, local_corpus, tmp_path, monkeypatch
):
    bucket = object_stores.make_bucket("s3")
    storage.upload_tree(small_corpus, f"{bucket}/raw")
    tokenizer = f"data.tokenizer={local_corpus / 'tokenizer.model'}"
    cfg = _config(
        f"data.paths=[{bucket}/raw]", f"data.cache_dir={bucket}/cache", "data.val_fraction=0.34",
        tokenizer,
    )  # fmt: skip
    here = _config(
        f"data.paths=[{small_corpus}]", f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.34", tokenizer,
    )  # fmt: skip
    expected = prepare_data(here.data, progress=False)
    for host in ("a", "b"):  # host a tokenizes and publishes the cache; host b fetches it
        monkeypatch.setenv("FLAXLM_CACHE", str(tmp_path / host))
        got = prepare_data(cfg.data, progress=False)
        assert got.cache_hit == (host == "b")
        for split in ("train", "val"):
            np.testing.assert_array_equal(
                getattr(got, split).tokens, getattr(expected, split).tokens
            )
    assert storage.exists(f"{bucket}/cache")
