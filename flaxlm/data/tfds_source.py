"""TFDS datasets on disk as a source (extra ``tfds``); flaxlm/data/tfds_build.py writes them.

No TensorFlow is needed: datasets are stored as array_record and read by random access.

A source ``tfds:NAME[/CONFIG][:VERSION]`` reads ``<data_dir>/NAME[/CONFIG]/<VERSION>/`` (the
newest version when none is given) with ``tfds.builder_from_directory(...).as_data_source``,
i.e. ``tfds.data_source`` pinned to that folder. flaxlm never downloads: a dataset that is not
prepared there fails at once with how to prepare it. Datasets built by ``build-tfds`` carry
each document's flaxlm id, so they split into train/val exactly as the original files do.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flaxlm.data.documents import DataError, Document, text_rows

ROWS_PER_READ = 1024
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "reading TFDS datasets needs tensorflow-datasets (not TensorFlow): "
            "pip install 'flaxlm[tfds]'"
        ) from None
    return tfds


def default_data_dir(data_dir: str = "") -> Path:
    """``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (as TFDS does)."""
    chosen = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return Path(chosen).expanduser()


def parse_spec(spec: str) -> tuple[str, str, str]:
    """``tfds:NAME[/CONFIG][:VERSION]`` -> (name, config or "", version or "")."""
    body = spec[len("tfds:") :] if spec.startswith("tfds:") else spec
    body, _, version = body.partition(":")
    name, _, config = body.partition("/")
    if (
        not _NAME.match(name)
        or (config and "/" in config)
        or (version and not _VERSION.match(version))
    ):
        raise DataError(
            f"TFDS source {spec!r} is malformed; expected tfds:NAME[/CONFIG][:VERSION] "
            "with a snake_case name and a version like 1.0.0"
        )
    return name, config, version


def prepared_dir(spec: str, data_dir: str = "") -> Path:
    """The folder holding the prepared dataset; DataError telling how to prepare it if none."""
    name, config, version = parse_spec(spec)
    root = (
        default_data_dir(data_dir) / name / config if config else default_data_dir(data_dir) / name
    )
    if version:
        candidates = [root / version]
    else:
        found = root.iterdir() if root.is_dir() else []
        versions = [p for p in found if _VERSION.match(p.name)]
        candidates = sorted(versions, key=lambda p: tuple(map(int, p.name.split("."))))[::-1]
    for folder in candidates:
        if (folder / "dataset_info.json").is_file():
            _check_array_record(folder, spec)
            return folder
    raise DataError(
        f"TFDS dataset {spec!r} is not prepared in {default_data_dir(data_dir)} (no "
        f"{root}/{version or '<version>'}/dataset_info.json) and flaxlm never downloads; "
        f"prepare it on a machine with network: `tfds build {name}"
        f"{'/' + config if config else ''} --data_dir DIR --file_format array_record` and copy "
        "DIR here, or build one from local files: `flaxlm data build-tfds FILES --name NAME`; "
        "then set data.tfds_data_dir"
    )


def _check_array_record(folder: Path, spec: str) -> None:
    info = json.loads((folder / "dataset_info.json").read_text())
    file_format = info.get("fileFormat", "tfrecord")
    if file_format != "array_record":
        raise DataError(
            f"TFDS dataset {spec!r} at {folder} is stored as {file_format}, which needs "
            "TensorFlow to read; rebuild it with --file_format array_record"
        )


def tfds_documents(spec: str, field: str, split: str, data_dir: str = "") -> Iterator[Document]:
    """Every record of ``split`` as a document; its text is the feature named ``field``.

    The id is the record's ``doc_id`` feature when it has one (datasets from ``build-tfds``),
    else ``NAME[/CONFIG]/SPLIT:<index>``.
    """
    folder = prepared_dir(spec, data_dir)
    tfds = import_tfds()
    builder = tfds.builder_from_directory(str(folder))
    splits = list(builder.info.splits.keys())
    if split not in splits:
        raise DataError(
            f"TFDS dataset {spec!r}: no split {split!r} (found: {', '.join(splits)}); "
            "set the source's split"
        )
    features = sorted(builder.info.features.keys())
    if field not in features:
        raise DataError(
            f"TFDS dataset {spec!r}: no feature {field!r} (found: {', '.join(features)}); "
            "set data.jsonl_field or the source's field"
        )
    source = builder.as_data_source(split=split)
    name, config, _ = parse_spec(spec)
    prefix = f"{name}/{config}/{split}" if config else f"{name}/{split}"
    has_ids = "doc_id" in features and field != "doc_id"
    for start in range(0, len(source), ROWS_PER_READ):
        records = source.__getitems__(range(start, min(start + ROWS_PER_READ, len(source))))
        docs = text_rows([r[field] for r in records], f"{spec} {split}", prefix, start)
        for record, doc in zip(records, docs, strict=True):
            doc_id = record["doc_id"] if has_ids else doc.doc_id
            yield Document(doc_id.decode() if isinstance(doc_id, bytes) else doc_id, doc.text)
