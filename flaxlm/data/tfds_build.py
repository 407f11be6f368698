"""Building a TFDS dataset (array_record) from the documents of flaxlm sources (extra ``tfds``).

    flaxlm data build-tfds corpus/ --name my_corpus --data-dir /shared/tfds
    # data.paths=[tfds:my_corpus] data.tfds_data_dir=/shared/tfds

Each record carries its document's flaxlm id, so the dataset, read back as ``tfds:my_corpus``
(flaxlm/data/tfds_source.py), splits into train/val exactly as the original files do.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flaxlm.data.documents import DataError
from flaxlm.data.sources import iter_documents
from flaxlm.data.tfds_source import default_data_dir, import_tfds, parse_spec


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
