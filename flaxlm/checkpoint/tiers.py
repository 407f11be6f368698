"""The persistent tier: a run's checkpoints in its run dir when Orbax writes them somewhere
else first.

Orbax (0.12) writes arrays through TensorStore to a local folder or, for GCS buckets only,
to GCS; it has no S3 path, and its GCS path cannot be pointed at an emulator. So every
checkpoint is written by Orbax to a local folder — ``checkpoint.local_dir`` (the fast
node-local tier) or a staging folder under ``$FLAXLM_CACHE`` — sealed there with its
manifest, and copied to the run dir through :mod:`flaxlm.storage`: every file first, the
manifest last. On an object store the manifest is the seal: a step whose upload was cut
short has no manifest and does not count. Deleting goes the other way, manifest first, so a
half-deleted step never looks complete. A restore of a step this host does not hold fetches
it into the local folder (``<step>.fetching``, renamed when whole) and checks it there
against its manifest, sizes and SHA-256s, before Orbax reads it.

With several hosts (no shared disk) each host writes its own part to its own local folder
and copies it up; process 0 seals the step once every host's copy is up
(:meth:`PersistentTier.upload_part`). A host restoring a step it does not hold whole fetches
the whole step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax

from flaxlm import storage
from flaxlm.checkpoint import hosts
from flaxlm.checkpoint.files import MANIFEST, CheckpointError, one_line

HOSTS = "hosts"  # in a step written by several hosts: each host's part manifest, <i>.json


def place_checkpoints(
    location: str, local_dir: str | Path | None
) -> tuple[Path, PersistentTier | None]:
    """Where Orbax writes the checkpoints of ``location`` (``RUN_DIR/checkpoints``), and the
    persistent tier they are copied to: none for a local run dir without a local tier. With
    several processes each writes its own part into ``process-<i>`` of its local folder
    (:mod:`flaxlm.checkpoint.hosts`), so hosts that share that folder do not collide."""
    if local_dir is None and storage.is_posix(location):
        return Path(location).absolute(), None
    local = Path(local_dir) if local_dir else storage.local_cache(location)
    if jax.process_count() > 1:
        local = local / f"process-{jax.process_index()}"
    return local.absolute(), PersistentTier(location)


class PersistentTier:
    """The checkpoints folder of a run dir (``RUN_DIR/checkpoints``), any store."""

    def __init__(self, url: str):
        self.url = url

    def _step(self, step: int, *parts: str) -> str:
        return storage.join(self.url, str(step), *parts)

    def steps(self) -> list[int]:
        """Sealed steps (with a manifest), oldest first."""
        names = [n for n in storage.children(self.url) if n.isdigit()]
        return sorted(int(n) for n in names if storage.info(self._step(int(n), MANIFEST)))

    def unsealed(self) -> list[int]:
        """Step folders without a manifest: uploads that were cut short."""
        names = [n for n in storage.children(self.url) if n.isdigit()]
        return sorted(int(n) for n in names if not storage.info(self._step(int(n), MANIFEST)))

    def upload(self, folder: Path, step: int) -> None:
        """Copies a sealed local checkpoint folder: its files, then its manifest."""
        storage.upload_tree(folder, self._step(step), skip=(MANIFEST,))
        storage.write_bytes(self._step(step, MANIFEST), (folder / MANIFEST).read_bytes())

    def upload_part(self, folder: Path, step: int) -> None:
        """Every host at once: copies the part of ``step`` that this host wrote, with its part
        manifest (``hosts/<i>.json``); once every host's copy is up, process 0 writes the
        manifest of the whole step (the seal). A host that failed makes every host raise a
        CheckpointError naming it, and the step stays unsealed."""
        index = jax.process_index()
        problem = None
        try:
            storage.upload_tree(folder, self._step(step), skip=(MANIFEST,))
            part = (folder / MANIFEST).read_bytes()
            storage.write_bytes(self._step(step, HOSTS, f"{index}.json"), part)
        except Exception as exc:  # told to every host, raised by each
            problem = one_line(exc)
        problem = hosts.first_problem(f"upload-{step}", problem)
        if problem is not None:
            raise CheckpointError(f"checkpoint {step} could not be copied to {self.url}: {problem}")
        if index != 0:
            return
        parts = [
            json.loads(storage.read_text(self._step(step, HOSTS, f"{i}.json")))
            for i in range(jax.process_count())
        ]
        manifest, differ = hosts.merge_parts(step, parts)
        for rel in differ:
            storage.write_bytes(self._step(step, rel), (folder / rel).read_bytes())
        storage.write_text(self._step(step, MANIFEST), json.dumps(manifest))

    def fetch(self, step: int, folder: Path) -> None:
        """Downloads ``step`` into ``folder`` (replacing what is there), whole or not at all."""
        partial = folder.with_name(folder.name + ".fetching")
        shutil.rmtree(partial, ignore_errors=True)
        storage.download_tree(self._step(step), partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)

    def fetch_if_needed(self, step: int, folder: Path) -> bool:
        """Makes ``folder`` hold ``step`` as the tier has it, unless its local copy is sealed
        with the same manifest (or only the local tier has the step). True if it fetched."""
        remote = self.manifest(step)
        if remote is None:
            return False  # local-tier only, or gone: the verification says which
        if (folder / MANIFEST).is_file() and (folder / MANIFEST).read_bytes() == remote:
            return False
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.fetch(step, folder)
        return True

    def manifest(self, step: int) -> bytes | None:
        try:
            return storage.read_bytes(self._step(step, MANIFEST))
        except FileNotFoundError:
            return None

    def read_meta(self, step: int) -> str:
        return storage.read_text(self._step(step, "meta", "metadata"))

    def delete(self, step: int) -> None:
        """Removes ``step``: its manifest first, so what is left of it does not count."""
        storage.delete(self._step(step, MANIFEST))
        storage.delete_tree(self._step(step))
