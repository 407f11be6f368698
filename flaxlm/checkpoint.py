"""Orbax checkpoints of a run: ``RUN_DIR/checkpoints/<step>/{state,meta,MANIFEST.json}``.

``state`` is the sharded TrainState (params, optimizer state, step). ``meta`` is JSON: the
data position, the skip ledger, the seed (the dropout RNG is a pure function of seed and step,
so it needs no state of its own), the resolved config and the tokenizer model, so a checkpoint
alone is enough to evaluate or sample.

Saves are asynchronous: ``save`` returns once the arrays are copied off the devices. Orbax
writes into ``<step>.orbax-checkpoint-tmp`` and renames it when complete; after that we write
``MANIFEST.json`` (every file's size and SHA-256) *last*. A checkpoint counts only with a
manifest that matches its files, so a crash mid-save, a truncated or bit-flipped file or an
empty step folder is never restored: :meth:`Checkpointer.restore` walks back to the newest
intact checkpoint and warns, naming the broken one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState

MANIFEST = "MANIFEST.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be read; the message names it."""


class Checkpointer:
    """Saves and restores the checkpoints of one run directory.

    Retention keeps the newest ``keep`` checkpoints plus any step in ``protect`` (the loop
    protects the newest known-good checkpoint so a rollback always has somewhere to go).
    """

    def __init__(self, run_dir: str | Path, keep: int = 3, asynchronous: bool = True):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.keep = keep
        self.is_writer = jax.process_index() == 0
        self._lock = threading.Lock()
        self._unsealed: list[int] = []  # saved by orbax, manifest not yet written
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours: it must spare the known-good checkpoint
            enable_async_checkpointing=asynchronous,
            create=True,
            async_options=(
                ocp.AsyncOptions(post_finalization_callback=self._seal_pending)
                if asynchronous
                else None
            ),
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    # -- what is on disk -------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of complete checkpoints (with a manifest), oldest first. Cheap: sizes only."""
        if not self.directory.is_dir():
            return []
        out = []
        for path in self.directory.iterdir():
            if path.name.isdigit() and (path / MANIFEST).is_file():
                out.append(int(path.name))
        return sorted(out)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def verify(self, step: int) -> str | None:
        """None if the checkpoint's files match its manifest, else what is wrong."""
        folder = self.directory / str(step)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            return f"no readable {MANIFEST} ({type(exc).__name__})"
        for rel, (size, digest) in manifest["files"].items():
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != size:
                return f"{rel} has {path.stat().st_size} bytes, expected {size}"
            if _sha256(path) != digest:
                return f"{rel} does not match its checksum"
        return None

    # -- saving ----------------------------------------------------------------------------

    def save(
        self,
        state: TrainState,
        meta: dict[str, Any],
        tokenizer_bytes: bytes,
        protect: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        """Starts saving ``state`` at ``state.step``; returns before the write finishes."""
        step = int(jax.device_get(state.step))
        # The previous save has had a whole checkpoint interval to finish; make sure, so that
        # at most one save is in flight and retention never races it.
        self.wait()
        self._prune(protect | {step})
        folder = self.directory / str(step)
        if folder.exists() and self.is_writer:
            # A stale folder from before a rollback, or an unsealed leftover: replace it.
            shutil.rmtree(folder)
        _sync(f"flaxlm-checkpoint-save-{step}")  # every process sees the same folders
        self._manager.reload()
        meta = dict(meta, step=step, tokenizer_b64=base64.b64encode(tokenizer_bytes).decode())
        with self._lock:
            self._unsealed.append(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        if not self._manager.is_saving_in_progress():
            self._seal_pending()  # synchronous save (or already finished)

    def _seal_pending(self) -> None:
        """Writes the manifest of every finished save: sizes and checksums, written last.

        Runs after Orbax finalizes a save (its callback, in a background thread) and in
        :meth:`wait`; a save still sitting in its temporary folder stays pending.
        """
        with self._lock:  # the callback thread and wait() may both get here
            for step in list(self._unsealed):
                folder = self.directory / str(step)
                if not folder.is_dir():
                    continue  # not renamed into place yet
                if self.is_writer:
                    _write_manifest(folder, step)
                self._unsealed.remove(step)

    def _prune(self, protect: set[int] | frozenset[int]) -> None:
        if not self.is_writer:
            return
        # Called just before a new save: leave room for it within ``keep``.
        steps = self.steps()
        older = steps[len(steps) - (self.keep - 1) :] if self.keep > 1 else []
        keep = set(older) | set(protect)
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.directory / str(step), ignore_errors=True)

    def delete_after(self, step: int) -> None:
        """Removes checkpoints newer than ``step`` (they hold weights from a bad stretch)."""
        self.wait()
        if self.is_writer:
            for s in self.steps():
                if s > step:
                    shutil.rmtree(self.directory / str(s), ignore_errors=True)
        _sync(f"flaxlm-checkpoint-delete-after-{step}")
        self._manager.reload()

    # -- restoring -------------------------------------------------------------------------

    def restore(
        self,
        abstract_state: TrainState,
        state_sh: TrainState,
        step: int | None = None,
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restores ``step``, or the newest intact checkpoint, into the given shardings.

        Passing the target shardings is what lets a checkpoint written on one mesh (or by N
        processes) load onto another. Without ``step``, broken checkpoints are skipped with a
        warning naming them; with ``step``, a broken one raises CheckpointError.
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        problems = []
        for s in candidates:
            problem = self.verify(s)
            if problem is None:
                try:
                    return self._restore_step(s, abstract_state, state_sh)
                except Exception as exc:  # orbax raises many types; name the checkpoint
                    problem = (
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    )
            message = f"checkpoint {self.directory / str(s)} is damaged: {problem}"
            if step is not None:
                raise CheckpointError(message)
            warnings.warn(message + "; trying an older one", stacklevel=2)
            problems.append(message)
        raise CheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(problems))

    def _restore_step(self, step: int, abstract_state: TrainState, state_sh: TrainState):
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            state_sh,
        )
        self._manager.reload()
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of a checkpoint (default: the newest complete one)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        path = self.directory / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} has no readable metadata: "
                f"{type(exc).__name__}"
            ) from exc

    def wait(self) -> None:
        """Blocks until every started save is durable on disk, manifest included."""
        self._manager.wait_until_finished()
        self._seal_pending()

    def close(self) -> None:
        self.wait()
        self._manager.close()


def tokenizer_bytes_from_meta(meta: dict[str, Any]) -> bytes:
    return base64.b64decode(meta["tokenizer_b64"])


def _sync(name: str) -> None:
    """A barrier across processes (no-op for one): only process 0 deletes folders."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _write_manifest(folder: Path, step: int) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[str(path.relative_to(folder))] = [path.stat().st_size, _sha256(path)]
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files}))
    os.replace(tmp, folder / MANIFEST)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
