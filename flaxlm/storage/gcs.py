"""Google Cloud Storage through google-cloud-storage. Credentials come from Application
Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth``, the TPU VM's
service account); ``STORAGE_EMULATOR_HOST`` points the client at an emulator. Conditional
writes use generation preconditions (``ifGenerationMatch=0`` creates, ``=<generation>``
replaces)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

from flaxlm.storage.base import ObjectInfo, StorageError, Store


@functools.cache
def _client():
    try:
        from google.cloud import storage
    except ImportError as exc:
        raise StorageError(
            "gs:// paths need google-cloud-storage: pip install 'flaxlm[cloud]'"
        ) from exc
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="flaxlm-emulator", credentials=AnonymousCredentials())
    return storage.Client()


class GcsStore(Store):
    def __init__(self, bucket: str):
        self.bucket = bucket

    def url(self, key: str) -> str:
        return f"gs://{self.bucket}/{key}"

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """The client's errors as FileNotFoundError (no such object) or a one-line
        StorageError naming the URL."""
        import requests
        from google.api_core import exceptions as gx
        from google.auth import exceptions as ax

        try:
            yield
        except gx.NotFound:
            raise FileNotFoundError(f"{self.url(key)} does not exist") from None
        except gx.GoogleAPICallError as exc:
            raise StorageError(f"{self.url(key)}: {exc.code} {exc.message}".strip()) from None
        except ax.DefaultCredentialsError:
            raise StorageError(
                f"{self.url(key)}: no Google Cloud credentials (set "
                "GOOGLE_APPLICATION_CREDENTIALS or run gcloud auth application-default login)"
            ) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            host = os.environ.get("STORAGE_EMULATOR_HOST", "storage.googleapis.com")
            raise StorageError(
                f"{self.url(key)}: cannot reach {host} ({type(exc).__name__})"
            ) from None

    def _blob(self, key: str):
        return _client().bucket(self.bucket).blob(key)

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            return b""
        end = None if length is None else start + length - 1
        with self._errors(key):
            return self._blob(key).download_as_bytes(start=start or None, end=end, timeout=60)

    def write(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self._blob(key).upload_from_string(data, timeout=60)

    def _upload_if(self, key: str, data: bytes, generation: int) -> str | None:
        from google.api_core import exceptions as gx

        with self._errors(key):  # the client itself may fail: no credentials
            blob = self._blob(key)
            try:
                blob.upload_from_string(data, if_generation_match=generation)
            except gx.PreconditionFailed:
                return None
        return str(blob.generation)

    def create(self, key: str, data: bytes) -> str | None:
        return self._upload_if(key, data, 0)

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        return self._upload_if(key, data, int(version))

    def info(self, key: str) -> ObjectInfo | None:
        with self._errors(key):
            blob = _client().bucket(self.bucket).get_blob(key)
        if blob is None:
            return None
        return ObjectInfo(int(blob.size), blob.updated.timestamp(), str(blob.generation))

    def _list(self, key: str, delimiter: str | None = None):
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        with self._errors(key):
            pages = _client().list_blobs(self.bucket, prefix=prefix, delimiter=delimiter)
            blobs = list(pages)
            return prefix, blobs, set(pages.prefixes)

    def children(self, key: str) -> list[str]:
        prefix, blobs, folders = self._list(key, delimiter="/")
        names = {b.name[len(prefix) :] for b in blobs} | {
            f[len(prefix) :].rstrip("/") for f in folders
        }
        # An emulator that ignores the delimiter lists everything: keep the first part.
        return sorted({n.split("/", 1)[0] for n in names if n})

    def walk(self, key: str) -> dict[str, int]:
        prefix, blobs, _ = self._list(key)
        return {b.name[len(prefix) :]: int(b.size) for b in blobs}

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError), self._errors(key):
            self._blob(key).delete()

    def upload_file(self, local_path: str, key: str) -> None:
        with self._errors(key):
            self._blob(key).upload_from_filename(local_path, timeout=300)

    def download_file(self, key: str, local_path: str) -> None:
        with self._errors(key):
            self._blob(key).download_to_filename(local_path, timeout=300)
