"""What every store offers: bytes in and out by key, conditional writes, listing, deleting,
range reads. A key is a ``/``-separated path inside the store (a folder of a local disk, a
bucket). Backends: :mod:`flaxlm.storage.local`, :mod:`flaxlm.storage.s3`,
:mod:`flaxlm.storage.gcs`; :mod:`flaxlm.storage` picks one from a URL.

A missing object raises FileNotFoundError on every backend; any other failure of a store
(credentials, permission, quota, an endpoint that does not answer) raises
:class:`StorageError`, an OSError with a one-line message naming the URL.
"""

from __future__ import annotations

from dataclasses import dataclass


class StorageError(OSError):
    """A store refused or could not be reached; the one-line message names the URL."""


@dataclass(frozen=True)
class ObjectInfo:
    """An object's size in bytes, when it was last written (seconds since the epoch, the
    store's clock) and its version: the token a conditional write compares (a generation
    on GCS, an ETag on S3, inode and mtime on a local disk)."""

    size: int
    mtime: float
    version: str


class Store:
    """One bucket (or the local file system). ``url(key)`` names a key in messages."""

    #: Whether files can be appended to and renamed into place (a POSIX file system).
    posix: bool = False

    def url(self, key: str) -> str:
        raise NotImplementedError

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """The object's bytes, or ``length`` of them from ``start`` (a range read)."""
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        """Writes the whole object at once: a reader sees the old bytes or the new ones."""
        raise NotImplementedError

    def create(self, key: str, data: bytes) -> str | None:
        """Writes ``key`` only if it does not exist and returns its version; None (nothing
        written) if it exists."""
        raise NotImplementedError

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        """Overwrites ``key`` only if it is still at ``version`` and returns the new version;
        None if it changed."""
        raise NotImplementedError

    def info(self, key: str) -> ObjectInfo | None:
        """Size, mtime and version of ``key``, or None when there is no such object."""
        raise NotImplementedError

    def children(self, key: str) -> list[str]:
        """The names directly under the folder ``key`` (objects and sub-folders)."""
        raise NotImplementedError

    def walk(self, key: str) -> dict[str, int]:
        """Every object under the folder ``key``: path relative to it -> size."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Deletes one object; a missing one is no error."""
        raise NotImplementedError

    def delete_tree(self, key: str) -> None:
        """Deletes the folder ``key`` and everything under it; a missing one is no error."""
        for rel in self.walk(key):
            self.delete(f"{key.rstrip('/')}/{rel}")

    def upload_file(self, local_path: str, key: str) -> None:
        with open(local_path, "rb") as f:
            self.write(key, f.read())

    def download_file(self, key: str, local_path: str) -> None:
        with open(local_path, "wb") as f:
            f.write(self.read(key))
