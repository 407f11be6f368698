"""flaxlm.storage: the same operations on a local folder, an S3 server and a GCS emulator
(both on 127.0.0.1), and one-line errors naming the URL."""

from __future__ import annotations

import re
from pathlib import Path

import object_stores
import pytest

from flaxlm import storage

# the servers' fixtures (tests/object_stores.py)
bucket, s3_server, gcs_server = (
    object_stores.bucket,
    object_stores.s3_server,
    object_stores.gcs_server,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["local", "s3", "gs"])
def where(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    from object_stores import make_bucket

    request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
    return make_bucket(request.param) + "/run"


def test_the_operations_agree_on_every_store(where):
    a = storage.join(where, "a.json")
    assert not storage.exists(a) and storage.info(a) is None
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(a)
    storage.make_dirs(where)
    storage.write_text(a, "hello world")
    assert storage.read_text(a) == "hello world"
    assert storage.read_bytes(a, 6, 5) == b"world"  # a range read
    assert storage.info(a).size == 11
    # conditional writes: create once, replace only at the version read
    lock = storage.join(where, "train.lock")
    assert storage.create(lock, b"first")
    assert not storage.create(lock, b"second")
    assert storage.read_bytes(lock) == b"first"
    version = storage.info(lock).version
    new = storage.replace(lock, b"third", version)
    assert new and new == storage.info(lock).version
    assert not storage.replace(lock, b"fourth", version)  # it changed since
    assert storage.read_bytes(lock) == b"third"
    storage.write_bytes(storage.join(where, "ckpt", "1", "x.bin"), b"12345")
    assert storage.children(where) == ["a.json", "ckpt", "train.lock"]
    assert storage.walk(storage.join(where, "ckpt")) == {"1/x.bin": 5}
    storage.delete_tree(storage.join(where, "ckpt"))
    storage.delete(a)
    storage.delete(a)  # a missing object is no error
    assert storage.children(where) == ["train.lock"]


def test_trees_go_up_and_come_back(where, tmp_path):
    src = tmp_path / "src"
    (src / "state" / "d").mkdir(parents=True)
    (src / "state" / "d" / "0").write_bytes(b"\x00" * 1000)
    (src / "meta").write_text("{}")
    assert storage.upload_tree(src, storage.join(where, "7")) == {"meta": 2, "state/d/0": 1000}
    got = storage.download_tree(storage.join(where, "7"), tmp_path / "back")
    assert got == {"meta": 2, "state/d/0": 1000}
    assert (tmp_path / "back" / "state" / "d" / "0").read_bytes() == b"\x00" * 1000


@pytest.mark.parametrize(
    "url, said",
    [
        ("gcs://bucket/run", "unsupported scheme gcs://"),
        ("s3:/bucket/run", "is not a URL: expected s3://BUCKET/PATH"),
        ("gs://B_ad/run", "'B_ad' is not a bucket name"),
    ],
)
def test_a_bad_url_is_one_line_naming_it(url, said):
    assert storage.store_of("hf:/data/wiki")[0].posix  # a source prefix, not a scheme
    with pytest.raises(storage.StorageError) as err:
        storage.check_url(url)
    assert said in str(err.value) and url in str(err.value) and "\n" not in str(err.value)


def test_an_unreachable_endpoint_is_one_line_naming_the_url(monkeypatch):
    pytest.importorskip("boto3")
    from object_stores import _forget_clients, free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    _forget_clients()
    try:
        with pytest.raises(storage.StorageError) as err:
            storage.read_bytes("s3://no-server-here/run/metrics.jsonl")
    finally:
        _forget_clients()
    text = str(err.value)
    assert "s3://no-server-here/run/metrics.jsonl" in text and "cannot reach" in text
    assert "\n" not in text


def test_missing_credentials_are_one_line_naming_the_url(monkeypatch, tmp_path):
    pytest.importorskip("boto3")
    from object_stores import _forget_clients, free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _forget_clients()
    try:
        with pytest.raises(storage.StorageError) as err:
            storage.write_text("s3://some-bucket/run/x", "x")
    finally:
        _forget_clients()
    assert "s3://some-bucket/run/x: no AWS credentials" in str(err.value)


@pytest.mark.parametrize("op", ["write_bytes", "create"])
def test_missing_google_credentials_are_one_line_naming_the_url(monkeypatch, tmp_path, op):
    """Every GCS call builds its client inside the error translation: a conditional create
    (the run lock's first write) once printed google.auth's traceback."""
    pytest.importorskip("google.cloud.storage")
    from object_stores import _forget_clients

    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    from google.auth.compute_engine import _metadata

    monkeypatch.setattr(_metadata, "_NO_GCE_CHECK", True)  # not a GCE VM: skip its probes
    _forget_clients()
    try:
        with pytest.raises(storage.StorageError) as err:
            getattr(storage, op)("gs://some-bucket/run/x", b"x")
    finally:
        _forget_clients()
    assert "gs://some-bucket/run/x: no Google Cloud credentials" in str(err.value)


# A storage scheme written out, or a URL taken apart: what only flaxlm/storage may do. (The
# data sources' own prefixes, "hf:" and "tfds:", name kinds of source, not places.)
SCHEME_CHECK = re.compile(r"""(gs|s3|gcs|file)://|startswith\(\s*["'](gs|s3)|urlparse|urlsplit""")


def test_nothing_outside_the_storage_layer_checks_a_scheme():
    offenders = []
    for path in sorted((ROOT / "flaxlm").rglob("*.py")):
        if path.parent.name == "storage":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if SCHEME_CHECK.search(line.split("#")[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "ask flaxlm.storage instead:\n" + "\n".join(offenders)


def test_the_cli_says_a_bad_url_in_one_line(capsys):
    from flaxlm.cli import main

    assert main(["eval", "gcs://bucket/run"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "flaxlm eval: error: 'gcs://bucket/run': unsupported scheme gcs://; "
        "expected a local path, gs:// or s3://\n"
    )
