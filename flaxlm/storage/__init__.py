"""One storage layer for every path flaxlm reads or writes: a local folder, ``gs://bucket/...``
or ``s3://bucket/...``. This package is the only place that looks at a path's scheme.

    from flaxlm import storage
    storage.write_text(storage.join(run_dir, "rollback.json"), text)   # whole, or not at all
    storage.create(lock_url, holder)        # False if it exists (If-None-Match / generation 0)
    storage.read_bytes(url, start, length)  # a range read

Each store keeps its own atomicity: a local file is written to a temporary file, synced and
renamed into place; an object is written in one PUT (readers see the old object or the new
one), and the things that must be taken once (the run lock) use conditional writes. Paths stay
strings: ``pathlib.Path("s3://b/x")`` would fold the ``//``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from flaxlm.storage.base import ObjectInfo, StorageError, Store
from flaxlm.storage.local import LocalStore

__all__ = [
    "ObjectInfo",
    "Store",
    "StorageError",
    "check_url",
    "children",
    "create",
    "delete",
    "delete_tree",
    "download_tree",
    "exists",
    "info",
    "is_posix",
    "join",
    "local_cache",
    "make_dirs",
    "native",
    "name_of",
    "parent_of",
    "publish",
    "fetch_sealed",
    "read_bytes",
    "read_text",
    "replace",
    "sha256",
    "stage",
    "store_of",
    "upload_tree",
    "walk",
    "write_bytes",
    "write_text",
]

_SCHEMES = ("gs", "s3")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(/?)(.*)$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def _split(url: str) -> tuple[str | None, str, str]:
    """(scheme or None for a local path, bucket, key). Raises StorageError for a URL flaxlm
    cannot use, naming it."""
    url = os.fspath(url)
    match = _URL.match(url)
    if match is None:
        return None, "", url
    scheme, second_slash, rest = match.group(1).lower(), match.group(2), match.group(3)
    if scheme not in _SCHEMES and not second_slash:
        return None, "", url  # "hf:/data/x": a data source's prefix on a local path
    if scheme not in _SCHEMES:
        raise StorageError(
            f"{url!r}: unsupported scheme {scheme}://; expected a local path, gs:// or s3://"
        )
    if not second_slash:
        raise StorageError(f"{url!r} is not a URL: expected {scheme}://BUCKET/PATH")
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise StorageError(
            f"{url!r}: {bucket!r} is not a bucket name; expected {scheme}://BUCKET/PATH"
        )
    return scheme, bucket, key.strip("/")


def check_url(url: str) -> str:
    """``url`` if flaxlm can use it (a local path, gs://BUCKET/..., s3://BUCKET/...); else a
    one-line StorageError naming it."""
    _split(url)
    return os.fspath(url)


@functools.cache
def _store(scheme: str | None, bucket: str) -> Store:
    if scheme is None:
        return LocalStore()
    if scheme == "s3":
        from flaxlm.storage.s3 import S3Store

        return S3Store(bucket)
    from flaxlm.storage.gcs import GcsStore

    return GcsStore(bucket)


def store_of(url: str) -> tuple[Store, str]:
    """The store holding ``url`` and the key inside it."""
    scheme, bucket, key = _split(url)
    return _store(scheme, bucket), key


def is_posix(url: str) -> bool:
    """Whether ``url`` is on a POSIX file system (files can be appended to, renamed, locked
    with O_EXCL), as opposed to an object store."""
    return store_of(url)[0].posix


def join(url: str, *parts: str) -> str:
    """``url/part/...``; a local path keeps the platform's joining rules."""
    if store_of(url)[0].posix:
        return str(Path(url, *parts))
    return "/".join([os.fspath(url).rstrip("/"), *(p.strip("/") for p in parts)])


def name_of(url: str) -> str:
    return os.fspath(url).rstrip("/").rsplit("/", 1)[-1]


def parent_of(url: str) -> str:
    if store_of(url)[0].posix:
        return str(Path(url).parent)
    return os.fspath(url).rstrip("/").rsplit("/", 1)[0]


def read_bytes(url: str, start: int = 0, length: int | None = None) -> bytes:
    """The bytes of ``url`` (``length`` of them from ``start``: a range read)."""
    store, key = store_of(url)
    return store.read(key, start, length)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Writes ``url`` whole: a reader (or a crash) sees the old content or the new."""
    store, key = store_of(url)
    store.write(key, data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def create(url: str, data: bytes) -> str | None:
    """Writes ``url`` only if it does not exist yet and returns its version (:func:`info`);
    None if it exists."""
    store, key = store_of(url)
    return store.create(key, data)


def replace(url: str, data: bytes, version: str) -> str | None:
    """Overwrites ``url`` only while it is at ``version`` (:func:`info`); returns the new
    version, or None if it had changed."""
    store, key = store_of(url)
    return store.replace(key, data, version)


def info(url: str) -> ObjectInfo | None:
    store, key = store_of(url)
    return store.info(key)


def exists(url: str) -> bool:
    """Whether ``url`` is an object (file) or a folder with something in it."""
    store, key = store_of(url)
    if store.posix:
        return os.path.exists(key)
    return store.info(key) is not None or bool(store.children(key))


def children(url: str) -> list[str]:
    """Names directly under the folder ``url``, sorted; [] if there is none."""
    store, key = store_of(url)
    return store.children(key)


def walk(url: str) -> dict[str, int]:
    """Every file under the folder ``url``: relative path -> size."""
    store, key = store_of(url)
    return store.walk(key)


def delete(url: str) -> None:
    store, key = store_of(url)
    store.delete(key)


def delete_tree(url: str) -> None:
    store, key = store_of(url)
    store.delete_tree(key)


def make_dirs(url: str) -> None:
    """Creates the folder ``url`` on a local disk; object stores have no folders."""
    store, key = store_of(url)
    if store.posix:
        Path(key).mkdir(parents=True, exist_ok=True)


def upload_tree(local_dir: str | Path, url: str, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Copies every file under ``local_dir`` to the folder ``url`` (names in ``skip`` are
    left out). Returns relative path -> size of what was copied."""
    store, key = store_of(url)
    root, copied = Path(local_dir), {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in skip:
            target = str(Path(key, rel)) if store.posix else f"{key}/{rel}"
            store.upload_file(str(path), target)
            copied[rel] = path.stat().st_size
    return copied


def download_tree(url: str, local_dir: str | Path) -> dict[str, int]:
    """Copies every file under the folder ``url`` into ``local_dir``; relative path -> size."""
    store, key = store_of(url)
    files = store.walk(key)
    for rel in files:
        target = Path(local_dir, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = str(Path(key, rel)) if store.posix else f"{key}/{rel}"
        store.download_file(source, str(target))
    return files


def local_cache(url: str, *parts: str) -> Path:
    """A local folder for what flaxlm keeps of ``url`` on this host (staged checkpoints,
    downloaded tokenizers): ``$FLAXLM_CACHE`` (default ``~/.cache/flaxlm``)/scheme/bucket/key.
    A local ``url`` is its own place."""
    scheme, bucket, key = _split(url)
    if scheme is None:
        return Path(key, *parts)
    root = Path(os.environ.get("FLAXLM_CACHE") or Path.home() / ".cache" / "flaxlm")
    return root.joinpath(scheme, bucket, *key.split("/"), *parts)


def native(url: str | Path) -> Path | str:
    """A local path as a :class:`~pathlib.Path`, a URL as the string it is (a Path would fold
    its ``//``)."""
    return Path(url) if is_posix(os.fspath(url)) else os.fspath(url)


def sha256(url: str, chunk: int = 8 << 20) -> str:
    """The SHA-256 of ``url``'s bytes, read ``chunk`` bytes at a time (range reads on an
    object store), so memory stays flat however large the file."""
    digest = hashlib.sha256()
    store, key = store_of(url)
    found = store.info(key)
    if found is None:
        raise FileNotFoundError(f"{url} does not exist")
    size = found.size
    for start in range(0, size, chunk):
        digest.update(store.read(key, start, min(chunk, size - start)))
    return digest.hexdigest()


def stage(url: str) -> Path:
    """A local copy of the file or folder ``url``: the path itself when local, else a copy in
    :func:`local_cache` that is downloaded once and again only for objects whose version
    changed (each file replaced whole). FileNotFoundError when ``url`` is neither."""
    store, key = store_of(url)
    if store.posix:
        return Path(key)
    target = local_cache(url)
    found = store.info(key)
    if found is not None:  # one object
        wanted = {"": (key, found.version)}
        book = target.with_name(f".{target.name}.versions.json")
    else:
        wanted = {rel: (f"{key}/{rel}", store.info(f"{key}/{rel}").version) for rel in walk(url)}
        book = target / ".flaxlm-versions.json"  # hidden: folder listings leave it out
    if not wanted:
        raise FileNotFoundError(f"{url} is neither an object nor a folder")
    try:
        have = json.loads(book.read_text())
    except (FileNotFoundError, ValueError):
        have = {}
    for rel, (source, version) in wanted.items():
        local = target / rel if rel else target
        if have.get(rel) != version or not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(f".{local.name}.partial")
            store.download_file(source, str(partial))
            os.replace(partial, local)
            have[rel] = version
            book.parent.mkdir(parents=True, exist_ok=True)
            book.write_text(json.dumps(have))
    return target


def publish(local_dir: str | Path, url: str, seal: str) -> dict[str, int]:
    """Copies the finished folder ``local_dir`` to ``url`` so that readers never see it half
    there: ``url/seal`` (the file that marks it complete, e.g. a manifest) is deleted first,
    every other file is copied (hidden ones, ``.*``, left out), and ``seal`` goes last.
    Returns relative path -> size of what was copied."""
    root = Path(local_dir)
    delete(join(url, seal))
    hidden = tuple(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    copied = upload_tree(root, url, skip=(seal, *hidden))
    write_bytes(join(url, seal), (root / seal).read_bytes())
    return copied | {seal: (root / seal).stat().st_size}


def fetch_sealed(url: str, local_dir: str | Path, seal: str) -> bool:
    """Downloads the folder ``url`` into ``local_dir`` (replacing it, whole or not at all) if
    it is complete, i.e. holds ``seal`` (see :func:`publish`); False when it does not."""
    if info(join(url, seal)) is None:
        return False
    target = Path(local_dir)
    partial = target.with_name(f".{target.name}.fetching-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    download_tree(url, partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return True
