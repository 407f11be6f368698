"""Real protocol servers on 127.0.0.1 for the object-store tests, started once per test
process: an S3 server (moto in server mode) and a GCS emulator (gcp-storage-emulator). Their
endpoints reach boto3 and google-cloud-storage, and the trainers the tests start, through the
usual variables ``AWS_ENDPOINT_URL`` and ``STORAGE_EMULATOR_HOST``.

    from tests.object_stores import bucket, object_store  # noqa: F401  (the fixtures)

    def test_x(bucket):            # a fresh empty bucket, as "s3://..." or "gs://..."
        ...
"""

from __future__ import annotations

import itertools
import logging
import os
import socket

import pytest

_COUNTER = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto")
    pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with _environ(env):
        yield env
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("google.cloud.storage")
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    _honour_generation_preconditions()
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"}
    with _environ(env):
        yield env
    server.stop()


def _honour_generation_preconditions() -> None:
    """gcp-storage-emulator ignores ``ifGenerationMatch`` on uploads, which GCS honours and
    the run lock relies on: its upload handler gets the check (412 when the object's
    generation differs; 0 = must not exist)."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    original = objects.insert
    if getattr(original, "checks_preconditions", False):
        return

    def insert(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        if wanted:
            name = request.query.get("name", [None])[0] or request.data["meta"].get("name")
            try:
                now = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
            except NotFound:
                now = "0"
            if now != wanted[0]:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                return None
        return original(request, response, storage, *args, **kwargs)

    insert.checks_preconditions = True
    objects.insert = insert
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = insert


def make_bucket(scheme: str) -> str:
    """A new empty bucket on the running server; its URL."""
    name = f"flaxlm-test-{os.getpid()}-{next(_COUNTER)}"
    if scheme == "s3":
        import boto3

        boto3.client("s3").create_bucket(Bucket=name)
    else:
        from flaxlm.storage.gcs import _client

        _client().create_bucket(name)
    return f"{scheme}://{name}"


@pytest.fixture(params=["s3", "gs"])
def bucket(request) -> str:
    """A fresh bucket on each server, as its URL."""
    request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
    return make_bucket(request.param)


class _environ:
    """Sets variables (and forgets the cached clients) for the servers' lifetime."""

    def __init__(self, env: dict[str, str]):
        self.env, self.old = env, {}

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        _forget_clients()

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _forget_clients()


def _forget_clients() -> None:
    from flaxlm.storage import gcs, s3

    s3._client.cache_clear()
    gcs._client.cache_clear()
