"""TFDS datasets on disk as a source, and building one from local files (extra ``tfds``).

No TensorFlow is needed: datasets are stored as array_record and read by random access.

    flaxlm data build-tfds corpus/ --name my_corpus --data-dir /shared/tfds
    # data.paths=[tfds:my_corpus] data.tfds_data_dir=/shared/tfds

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
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flaxlm.data.sources import DataError, Document, iter_documents, text_rows

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


def build_tfds(
    paths: Iterable[str],
    name: str,
    data_dir: str = "",
    field: str = "text",
    version: str = "1.0.0",
    split: str = "train",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes the documents of flaxlm sources as a TFDS array_record dataset; returns its folder.

    Features: ``text`` (the document) and ``doc_id`` (its flaxlm id). Records keep the
    sources' order (shuffling is disabled). An existing folder is refused unless ``overwrite``.
    """
    name, config, version = parse_spec(f"tfds:{name}:{version}")
    if config:
        raise DataError(f"build-tfds --name {name}/{config}: configs are not supported")
    paths = list(paths)
    # A first pass fails on bad input before data_dir is touched, in constant memory.
    n_docs = sum(1 for _ in iter_documents(paths, field))
    out = default_data_dir(data_dir) / name / version
    if out.exists():
        if not overwrite:
            raise DataError(f"{out} already exists; pass --overwrite to rebuild it")
        shutil.rmtree(out)
    tfds = import_tfds()
    if not progress:
        tfds.disable_progress_bar()
    builder_cls = _builder_class(tfds, name, version, split, paths, field, n_docs)
    builder = builder_cls(data_dir=str(default_data_dir(data_dir)), file_format="array_record")
    builder.download_and_prepare()
    shutil.rmtree(default_data_dir(data_dir) / "downloads", ignore_errors=True)
    return out


def _builder_class(
    tfds: Any, name: str, version: str, split: str, paths: list[str], field: str, n_docs: int
) -> type:
    """A GeneratorBasedBuilder named ``name`` over the sources' documents, in this module.

    TFDS derives the builder's code location from its module, which must live in a package;
    registration is skipped so that several datasets can be built in one process.
    """

    def _info(self):
        features = tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "doc_id": tfds.features.Text()}
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{n_docs} text documents written by flaxlm data build-tfds.",
            features=features,
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples()}

    def _generate_examples(self):
        for i, doc in enumerate(iter_documents(paths, field)):
            yield i, {"text": doc.text, "doc_id": doc.doc_id}

    attrs = {
        "name": name,
        "VERSION": tfds.core.Version(version),
        "RELEASE_NOTES": {version: "Built by flaxlm data build-tfds."},
        "disable_shuffling": True,  # keep the sources' document order
        "_info": _info,
        "_split_generators": _split_generators,
        "_generate_examples": _generate_examples,
        "__module__": __name__,
    }
    with tfds.core.registered.skip_registration():
        return type(f"FlaxlmText_{name}", (tfds.core.GeneratorBasedBuilder,), attrs)
