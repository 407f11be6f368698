"""The local file system as a store: a key is a path. Whole-file writes go through a
temporary file that is synced and renamed into place (then the folder is synced), so a crash
leaves the old file or the new one, never half of either."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from flaxlm.storage.base import ObjectInfo, Store


class LocalStore(Store):
    posix = True

    def url(self, key: str) -> str:
        return key

    def read(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        with open(key, "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)

    def write(self, key: str, data: bytes) -> None:
        path = Path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._synced_tmp(path, data)
        os.replace(tmp, path)
        _sync_folder(path.parent)

    def create(self, key: str, data: bytes) -> str | None:
        # A hard link fails if the name exists, and the linked file already holds all of
        # ``data``: no reader ever sees the lock (or manifest) half written.
        path = Path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._synced_tmp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        _sync_folder(path.parent)
        return self.info(key).version

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        current = self.info(key)
        if current is None or current.version != version:
            return None
        self.write(key, data)
        return self.info(key).version

    def info(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(key)
        except FileNotFoundError:
            return None
        return ObjectInfo(st.st_size, st.st_mtime, f"{st.st_ino}:{st.st_mtime_ns}")

    def children(self, key: str) -> list[str]:
        try:
            return sorted(os.listdir(key))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def walk(self, key: str) -> dict[str, int]:
        root = Path(key)
        if not root.is_dir():
            return {}
        return {
            str(p.relative_to(root)): p.stat().st_size
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    def delete(self, key: str) -> None:
        try:
            os.unlink(key)
        except FileNotFoundError:
            pass

    def delete_tree(self, key: str) -> None:
        shutil.rmtree(key, ignore_errors=True)

    def upload_file(self, local_path: str, key: str) -> None:
        Path(key).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        shutil.copyfile(local_path, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, key)

    def download_file(self, key: str, local_path: str) -> None:
        shutil.copyfile(key, local_path)

    @staticmethod
    def _synced_tmp(path: Path, data: bytes) -> str:
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
