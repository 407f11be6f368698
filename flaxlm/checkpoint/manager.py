"""Orbax checkpoints of a run: ``RUN_DIR/checkpoints/<step>/{state,meta,MANIFEST.json}``.

``state`` is the sharded TrainState (params, optimizer state, step). ``meta`` is JSON: the
data position, the skip ledger, the seed (the dropout RNG is a pure function of seed and step,
so it needs no state of its own), the resolved config and the tokenizer model, so a checkpoint
alone is enough to evaluate or sample.

Saves are asynchronous: ``save`` returns once the arrays are copied off the devices. Orbax
writes into ``<step>.orbax-checkpoint-tmp`` and renames it when complete; after that we write
``MANIFEST.json`` (every file's size and SHA-256) *last*. A checkpoint counts only with a
manifest that matches its files. Only such *verified* damage — a file missing, truncated or
bit-flipped, metadata that cannot be parsed — makes :meth:`Checkpointer.restore` walk back to
an older checkpoint (with a warning naming the broken one, recorded in ``walked_past``). An
intact checkpoint that does not fit the state asked for (a changed model shape) and a read
that keeps failing with an I/O error are one-line :class:`CheckpointError` s instead: nothing
is walked past, so nothing gets deleted. A save that fails (a full disk) is a one-line
CheckpointError too, raised by ``save`` or, for an asynchronous save, by the next ``save``,
``wait`` or ``close``. The manifest, the retries and the sorting of I/O errors are in
:mod:`flaxlm.checkpoint.files`; the checks that choose what a restore takes in
:mod:`flaxlm.checkpoint.checks`; several hosts writing their own parts in
:mod:`flaxlm.checkpoint.hosts`.

A run dir on an object store, or a fast local tier (``local_dir``), puts Orbax's folder on
local disk and copies the sealed checkpoints into the run dir (:mod:`flaxlm.checkpoint.tiers`):
``steps`` and a restore see both tiers alike, newest first.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
from flax.training.train_state import TrainState

# CheckpointError and MANIFEST are defined there and imported from here by the rest of flaxlm.
from flaxlm import storage
from flaxlm.checkpoint import hosts
from flaxlm.checkpoint.checks import CheckpointChecks
from flaxlm.checkpoint.files import (
    MANIFEST,
    CheckpointError,
    is_disk_full,
    is_io_error,
    one_line,
    retrying,
    write_manifest,
)
from flaxlm.checkpoint.tiers import place_checkpoints

ORBAX_TMP = ".orbax-checkpoint-tmp"  # in the names of the folders Orbax writes into
SEAL_POLL_S = 0.05  # how often the sealing thread looks whether an asynchronous save is done


class Checkpointer(CheckpointChecks):
    """Saves and restores the checkpoints of one run directory.

    Retention keeps the newest ``keep`` complete checkpoints plus any step in ``protect`` (the
    loop protects the newest known-good checkpoint and the candidates, so a rollback always
    has somewhere to go).
    """

    def __init__(
        self,
        run_dir: str | Path,
        keep: int = 3,
        asynchronous: bool = True,
        local_dir: str | Path | None = None,
    ):
        # Orbax writes into ``directory`` (always local); ``tier`` is the run dir's copy when
        # that is elsewhere (an object store, or the persistent side of a local tier).
        self.location = storage.join(str(run_dir), "checkpoints")
        self.directory, self.tier = place_checkpoints(self.location, local_dir)
        # A staging folder's copies are a cache: only a local tier's own saves count.
        self.local_tier = local_dir is not None
        self.keep = keep
        self.is_writer = jax.process_index() == 0  # deletes in the run dir; seals a step
        # Several hosts without a shared disk: each writes its own part into its own folder
        # (flaxlm.checkpoint.hosts) and tends that folder itself.
        self.own_folders = hosts.per_host() and self.tier is not None
        self.owns_folder = self.is_writer or self.own_folders
        self.fetched: set[int] = set()  # steps a restore took from the persistent tier
        self._layout: str | None = None  # this host's shards in the state being restored
        # Damaged steps the last restore skipped, newest first: what a resume may delete.
        self.walked_past: list[int] = []
        self._lock = threading.Lock()
        # saved by orbax, manifest not yet written: (step, the host's part or None)
        self._unsealed: list[tuple[int, dict | None]] = []
        self._in_flight: int | None = None  # the step of the save not yet waited for
        self._last_started: int | None = None
        self._cleaned = False  # leftovers of killed saves removed (at the first save)
        self._intact: dict[int, dict[str, tuple]] = {}  # verified step -> saved array shapes
        self._persist: set[int] = set()  # saved steps the sealing copies into the tier
        self._seal_error: BaseException | None = None  # from the sealing thread
        self._manager = hosts.orbax_manager(self.directory, asynchronous, self.own_folders)

    # -- what is on disk -------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of complete checkpoints (with a manifest), oldest first. Cheap: no reads."""
        out = set(self.tier.steps()) if self.tier is not None else set()
        if self.tier is None or self.local_tier:
            out.update(self.local_steps())
        return sorted(out)

    def local_steps(self) -> list[int]:
        """Steps sealed in the local folder (all of them when there is no second tier)."""
        if not self.directory.is_dir():
            return []
        names = (p.name for p in self.directory.iterdir() if (p / MANIFEST).is_file())
        return sorted(int(n) for n in names if n.isdigit())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    # -- saving ----------------------------------------------------------------------------

    def save(
        self,
        state: TrainState,
        meta: dict[str, Any],
        tokenizer_bytes: bytes,
        protect: set[int] | frozenset[int] = frozenset(),
        persistent: bool = True,
    ) -> None:
        """Starts saving ``state`` at ``state.step``; returns before the write finishes.
        ``persistent=False`` keeps it in the local tier only (``local_dir``).

        Raises CheckpointError when this save, or the previous asynchronous one, failed to
        write (e.g. the disk is full); the checkpoints saved before are left intact.
        """
        step = int(jax.device_get(state.step))
        # The previous save has had a whole checkpoint interval to finish; make sure, so that
        # at most one save is in flight and retention never races it.
        self.wait()
        if not self._cleaned:
            self.remove_incomplete()
        self._prune(protect | {step})
        folder = self.directory / str(step)
        if folder.exists() and self.owns_folder:
            # A stale folder from before a rollback, or an unsealed leftover: replace it.
            shutil.rmtree(folder)
        if self.tier is not None and self.is_writer and persistent:
            self.tier.delete(step)
        self._intact.pop(step, None)
        _sync(f"flaxlm-checkpoint-save-{step}")  # every process sees the same folders
        self._manager.reload()
        meta = dict(meta, step=step, tokenizer_b64=base64.b64encode(tokenizer_bytes).decode())
        part = hosts.host_part(hosts.layout_of(state)) if self.own_folders else None
        with self._lock:
            self._unsealed.append((step, part))
            if self.tier is not None and persistent:
                self._persist.add(step)
        self._in_flight = self._last_started = step
        try:
            args = hosts.save_args(state, meta, self.own_folders)
            self._manager.save(step, args=args, force=True)
            if not self._manager.is_saving_in_progress():
                self._seal_pending()  # synchronous save (or already finished)
                self._in_flight = None
            else:
                threading.Thread(
                    target=self._seal_when_done, name="flaxlm-seal", daemon=True
                ).start()
        except Exception as exc:
            self._save_failed(step, exc)

    def _seal_when_done(self) -> None:
        """Seals an asynchronous save as soon as Orbax has moved it into place (a background
        thread), so a kill any time after that finds the checkpoint complete — not only after
        the next save or :meth:`wait`. Orbax's own post-finalization callback runs before the
        folder is renamed, too early to seal."""
        try:
            while self._manager.is_saving_in_progress():
                time.sleep(SEAL_POLL_S)
            self._seal_pending()
        except Exception as exc:  # raised as one line by the next save, wait or close
            self._seal_error = exc

    def _seal_pending(self) -> None:
        """Writes the manifest of every finished save: sizes and checksums, written last.

        Runs in the sealing thread and in :meth:`wait`; a save still sitting in its temporary
        folder stays pending.
        """
        with self._lock:  # the callback thread and wait() may both get here
            for step, part in list(self._unsealed):
                folder = self.directory / str(step)
                if not folder.is_dir():
                    continue  # not renamed into place yet
                if self.owns_folder:
                    write_manifest(folder, step, host=part)
                if step in self._persist and self.own_folders:
                    self.tier.upload_part(folder, step)  # every host; sealed by process 0
                elif step in self._persist and self.is_writer:
                    self.tier.upload(folder, step)
                self._persist.discard(step)
                self._unsealed.remove((step, part))

    def _save_failed(self, step: int | None, exc: Exception) -> None:
        """Raises for a failed save of ``step``: a one-line CheckpointError for a write error
        (a full disk), ``exc`` itself for anything else. Call it from an ``except`` block.
        What the save left (Orbax may still be unwinding it) goes at the next save."""
        with self._lock:
            self._unsealed = [(s, p) for s, p in self._unsealed if s != step]
            self._persist.discard(step)
        self._in_flight, self._seal_error = None, None
        self._cleaned = False
        if not is_io_error(exc):
            raise exc
        run_dir = storage.parent_of(self.location)
        intact = f"the checkpoints before it are intact ({self.steps() or 'none'})"
        if is_disk_full(exc):
            raise CheckpointError(
                f"the disk is full: checkpoint {step} could not be saved in {run_dir}; "
                f"{intact}: free some space and rerun to resume"
            ) from exc
        raise CheckpointError(
            f"checkpoint {step} could not be saved in {run_dir} ({one_line(exc)}); {intact}"
        ) from exc

    def _prune(self, protect: set[int] | frozenset[int]) -> None:
        if not self.owns_folder:
            return

        # Called just before a new save: leave room for it within ``keep``. With two tiers
        # each keeps its own newest, so the run dir never loses its last checkpoints to a
        # stream of local saves.
        def keep(steps: list[int]) -> set[int]:
            room = max(self.keep - 1, 0)
            return set(steps[max(len(steps) - room, 0) :] if room else []) | set(protect)

        if self.tier is None:
            for step in sorted(set(self.steps()) - keep(self.steps())):
                self._remove(step)
            return
        for step in sorted(set(self.local_steps()) - keep(self.local_steps())):
            self._intact.pop(step, None)
            shutil.rmtree(self.directory / str(step), ignore_errors=True)
        if not self.is_writer:
            return
        for step in sorted(set(self.tier.steps()) - keep(self.tier.steps())):
            self._intact.pop(step, None)
            self.tier.delete(step)

    def _remove(self, step: int) -> None:
        """Deletes ``step`` from this host's folder, and process 0 from the run dir (the
        persistent copy's manifest first)."""
        self._intact.pop(step, None)
        if self.owns_folder:
            shutil.rmtree(self.directory / str(step), ignore_errors=True)
        if self.tier is not None and self.is_writer:
            self.tier.delete(step)

    def remove_incomplete(self) -> list[str]:
        """Removes what killed saves leave behind: Orbax temporary folders
        (``<step>.orbax-checkpoint-tmp*``) and step folders without a manifest. Only process
        0 deletes, and only after this Checkpointer's own save is done; the first ``save``
        calls it. Never call it from a reader: a trainer may be saving into that folder.
        Returns the names removed."""
        self.wait()
        removed = []
        if self.owns_folder and self.directory.is_dir():
            for path in self.directory.iterdir():
                unsealed = path.name.isdigit() and not (path / MANIFEST).exists()
                fetching = path.name.endswith(".fetching")
                if path.is_dir() and (ORBAX_TMP in path.name or unsealed or fetching):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
        if self.is_writer and self.tier is not None:
            for step in self.tier.unsealed():
                self.tier.delete(step)
                removed.append(str(step))
        self._cleaned = True
        _sync("flaxlm-checkpoint-remove-incomplete")
        self._manager.reload()
        return sorted(removed)

    def delete_after(self, step: int, only: Iterable[int] | None = None) -> None:
        """Removes the checkpoints newer than ``step`` — all of them (a rollback: they hold
        weights from a bad stretch), or just those in ``only`` (a resume: pass
        ``walked_past``, the damaged ones, so nothing intact is ever deleted)."""
        self.wait()
        chosen = None if only is None else set(only)
        for s in self.steps():
            if s > step and (chosen is None or s in chosen):
                self._remove(s)
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
        processes) load onto another. Without ``step``, damaged checkpoints are skipped with
        a warning naming them and listed in ``walked_past``; a damaged ``step`` raises.
        A checkpoint that does not fit ``abstract_state`` and an I/O error that outlasts
        the retries raise CheckpointError without walking back.
        """
        self.walked_past = []
        if self.own_folders:
            self._layout = hosts.layout_of(abstract_state, state_sh)
            self._intact.clear()  # checked for another layout, perhaps
        step = self.newest_intact() if step is None else self.check_intact(step)
        folder = self.directory / str(step)
        self._check_fits(step, abstract_state)
        try:
            return retrying(
                f"reading checkpoint {folder}",
                lambda: self._restore_step(step, abstract_state, state_sh),
            )
        except CheckpointError:
            raise
        except Exception as exc:  # intact and fitting, yet orbax fails: name the checkpoint
            raise CheckpointError(f"cannot restore checkpoint {folder}: {one_line(exc)}") from exc

    def _restore_step(self, step: int, abstract_state: TrainState, state_sh: TrainState):
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            state_sh,
        )
        self._manager.reload()
        restored = self._manager.restore(step, args=hosts.restore_args(target, self.own_folders))
        return restored["state"], dict(restored["meta"])

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of a checkpoint (default: the newest complete one)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        path = self.directory / str(step) / "meta" / "metadata"
        read = path.read_text
        if self.tier is not None and not (path.parent.parent / MANIFEST).is_file():
            path = storage.join(self.location, str(step), "meta", "metadata")

            def read() -> str:
                return self.tier.read_meta(step)

        try:
            return json.loads(retrying(f"reading {path}", read))
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} has no readable metadata: "
                f"{type(exc).__name__}"
            ) from exc

    def wait(self) -> None:
        """Blocks until every started save is durable on disk, manifest included. Raises
        CheckpointError when an asynchronous save failed to write."""
        try:
            self._manager.wait_until_finished()
            self._seal_pending()
            if self._seal_error is not None:
                raise self._seal_error
        except Exception as exc:
            # At most one save runs at a time: a failure here is the last one started (an
            # asynchronous save that failed at once has already left _in_flight).
            failed = self._in_flight if self._in_flight is not None else self._last_started
            self._save_failed(failed, exc)
        self._in_flight = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def tokenizer_bytes_from_meta(meta: dict[str, Any]) -> bytes:
    return base64.b64decode(meta["tokenizer_b64"])


def _sync(name: str) -> None:
    """A barrier across processes (no-op for one): only process 0 deletes folders."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
