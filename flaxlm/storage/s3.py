"""Amazon S3 and S3-compatible stores (MinIO, Ceph, moto) through boto3. The endpoint, region
and credentials come from boto3's usual sources: ``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, instance roles. Conditional
writes use ``If-None-Match: *`` (create) and ``If-Match: <etag>`` (replace)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from flaxlm.storage.base import ObjectInfo, StorageError, Store

_MISSING = {"NoSuchKey", "404", "NotFound"}
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


@functools.cache
def _client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise StorageError("s3:// paths need boto3: pip install 'flaxlm[cloud]'") from exc
    config = Config(
        connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}
    )
    return boto3.session.Session().client("s3", config=config)


def _transfer_error() -> type[Exception]:
    from boto3.exceptions import S3UploadFailedError

    return S3UploadFailedError


class S3Store(Store):
    def __init__(self, bucket: str):
        self.bucket = bucket

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """boto3's errors as FileNotFoundError (no such object) or a one-line StorageError."""
        from botocore import exceptions as bx

        try:
            yield
        except bx.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise FileNotFoundError(f"{self.url(key)} does not exist") from None
            message = exc.response.get("Error", {}).get("Message", "") or code
            raise StorageError(f"{self.url(key)}: {code}: {message}") from None
        except bx.NoCredentialsError:
            raise StorageError(
                f"{self.url(key)}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or a profile or instance role)"
            ) from None
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError) as exc:
            raise StorageError(
                f"{self.url(key)}: cannot reach the S3 endpoint {exc.kwargs.get('endpoint_url')}"
                " (check AWS_ENDPOINT_URL and the network)"
            ) from None
        except (bx.BotoCoreError, _transfer_error()) as exc:
            raise StorageError(f"{self.url(key)}: {type(exc).__name__}: {exc}") from None

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        extra = {}
        if start or length is not None:
            end = "" if length is None else str(start + length - 1)
            if length == 0:
                return b""
            extra["Range"] = f"bytes={start}-{end}"
        with self._errors(key):
            return _client().get_object(Bucket=self.bucket, Key=key, **extra)["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        with self._errors(key):
            _client().put_object(Bucket=self.bucket, Key=key, Body=data)

    def create(self, key: str, data: bytes) -> str | None:
        return self._put_if(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        return self._put_if(key, data, IfMatch=version)

    def _put_if(self, key: str, data: bytes, **condition: str) -> str | None:
        from botocore import exceptions as bx

        with self._errors(key):
            try:
                put = _client().put_object(Bucket=self.bucket, Key=key, Body=data, **condition)
            except bx.ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) in _CONFLICT:
                    return None
                raise
        return put["ETag"]

    def info(self, key: str) -> ObjectInfo | None:
        try:
            with self._errors(key):
                head = _client().head_object(Bucket=self.bucket, Key=key)
        except FileNotFoundError:
            return None
        mtime = head["LastModified"].timestamp()
        return ObjectInfo(int(head["ContentLength"]), mtime, head["ETag"])

    def _pages(self, key: str, **extra):
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        with self._errors(key):
            paginator = _client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, **extra):
                yield prefix, page

    def children(self, key: str) -> list[str]:
        names = set()
        for prefix, page in self._pages(key, Delimiter="/"):
            names |= {o["Key"][len(prefix) :] for o in page.get("Contents", [])}
            names |= {
                p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            }
        return sorted(n for n in names if n)

    def walk(self, key: str) -> dict[str, int]:
        out = {}
        for prefix, page in self._pages(key):
            for o in page.get("Contents", []):
                out[o["Key"][len(prefix) :]] = int(o["Size"])
        return out

    def delete(self, key: str) -> None:
        with self._errors(key):
            _client().delete_object(Bucket=self.bucket, Key=key)

    def upload_file(self, local_path: str, key: str) -> None:
        with self._errors(key):
            _client().upload_file(local_path, self.bucket, key)

    def download_file(self, key: str, local_path: str) -> None:
        with self._errors(key):
            _client().download_file(self.bucket, key, local_path)
