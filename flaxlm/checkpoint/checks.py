"""Which checkpoint a restore may take: the checks behind
:meth:`flaxlm.checkpoint.manager.Checkpointer.restore`, split from the manager by concern.

A checkpoint counts when its files match its manifest, its metadata parses and Orbax can
read its array metadata (:meth:`CheckpointChecks.verify`, ``_local_damage``). Only such
verified damage makes a restore walk back to an older step; an I/O error is retried and then
raised, never walked past (:func:`flaxlm.checkpoint.files.retrying`). With a second tier the
local copy serves when every host's is intact, else the step is fetched from the run dir; with
several hosts of their own folders every answer is agreed (:mod:`flaxlm.checkpoint.hosts`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import orbax.checkpoint as ocp
from flax.training.train_state import TrainState

from flaxlm import storage
from flaxlm.checkpoint import hosts
from flaxlm.checkpoint.files import MANIFEST, CheckpointError, manifest_problem, one_line, retrying
from flaxlm.checkpoint.fitting import fit_problem, saved_shapes
from flaxlm.checkpoint.tiers import PersistentTier


class CheckpointChecks:
    """The verification half of :class:`flaxlm.checkpoint.manager.Checkpointer`, which sets
    the attributes below and provides ``steps``, ``local_steps`` and ``_manager``."""

    directory: Path  # where Orbax's folders are, on this host
    location: str  # RUN_DIR/checkpoints
    tier: PersistentTier | None
    own_folders: bool
    is_writer: bool
    fetched: set[int]
    walked_past: list[int]
    _intact: dict[int, dict[str, tuple]]
    _layout: str | None
    _manager: ocp.CheckpointManager

    def steps(self) -> list[int]:
        raise NotImplementedError

    def local_steps(self) -> list[int]:
        raise NotImplementedError

    def restorable_steps(self) -> list[int]:
        """The steps a restore chooses from, oldest first: :meth:`steps`, and with several
        hosts of their own folders the same list on every host (those in the run dir and
        those every host holds locally). Every process must call it."""
        if not self.own_folders:
            return self.steps()
        mine = [self.local_steps(), self.tier.steps() if self.is_writer else []]
        said = [json.loads(text) for text in hosts.exchange("steps", json.dumps(mine))]
        everywhere = set.intersection(*(set(local) for local, _ in said))
        return sorted(everywhere | set(said[0][1]))

    def verify(self, step: int) -> str | None:
        """None if the checkpoint's files match its manifest and its metadata parses, else
        what is wrong. An I/O error while reading raises OSError: that is not damage."""
        folder = self.directory / str(step)
        problem = manifest_problem(folder)
        if problem is not None:
            return problem
        try:
            json.loads((folder / "meta" / "metadata").read_text())
        except FileNotFoundError:
            return "meta/metadata is missing"
        except ValueError:
            return "meta/metadata is not valid JSON"
        return None

    def newest_intact(self) -> int:
        """The newest checkpoint without verified damage. Damaged newer ones are skipped with
        a warning naming each, and listed in ``walked_past`` (newest first)."""
        steps = self.restorable_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        self.walked_past, problems = [], []
        for step in reversed(steps):
            problem = self._damage(step)
            if problem is None:
                return step
            message = f"checkpoint {self.directory / str(step)} is damaged: {problem}"
            warnings.warn(message + "; trying an older one", stacklevel=3)
            self.walked_past.append(step)
            problems.append(message)
        raise CheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(problems))

    def check_intact(self, step: int) -> int:
        """``step`` if that checkpoint has no verified damage, else a CheckpointError saying
        what is wrong with it (no walking back: it was asked for by name)."""
        folder = self.directory / str(step)
        steps = self.restorable_steps()
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint {storage.join(self.location, str(step))} (have: {steps or 'none'})"
            )
        problem = self._damage(step)
        if problem is not None:
            raise CheckpointError(f"checkpoint {folder} is damaged: {problem}")
        return step

    def _damage(self, step: int) -> str | None:
        """What is wrong with ``step``, the same answer on every host; None when intact (then
        the saved array shapes are kept for :meth:`_check_fits`). The local copy serves when
        every host's is intact; else the persistent tier's copy is fetched and checked."""
        if step in self._intact:
            return None
        folder = self.directory / str(step)
        problem = hosts.first_problem(f"local-{step}", self._local_damage(step))
        if problem is not None and self.tier is not None and self.tier.manifest(step):
            retrying(f"fetching checkpoint {folder}", lambda: self.tier.fetch(step, folder))
            self._manager.reload()
            self.fetched.add(step)
            problem = hosts.first_problem(f"fetched-{step}", self._local_damage(step))
        if problem is not None:
            self._intact.pop(step, None)
        return problem

    def _local_damage(self, step: int) -> str | None:
        """What is wrong with this host's local copy of ``step`` for this restore: damage
        (:meth:`verify`), another host's part, a stale copy of a step the run dir holds anew,
        unreadable Orbax metadata. None when it serves (its array shapes are then kept)."""
        folder = self.directory / str(step)

        def check() -> str | None:
            problem = self.verify(step)
            if problem is not None:
                return problem
            manifest = (folder / MANIFEST).read_bytes()
            part = json.loads(manifest).get("host")
            if part is not None:
                problem = hosts.part_problem(part, self._layout)
            elif self.tier is not None and self.tier.manifest(step) not in (None, manifest):
                problem = "it is an older copy than the run dir's"
            if problem is not None:
                return problem
            try:
                tree = ocp.StandardCheckpointHandler().metadata(folder / "state")
            except OSError:
                raise
            except Exception as exc:  # orbax raises many types for a bad _METADATA
                return f"its array metadata cannot be read ({one_line(exc)})"
            self._intact[step] = saved_shapes(getattr(tree, "tree", tree))
            return None

        return retrying(f"checking checkpoint {folder}", check)

    def _check_fits(self, step: int, abstract_state: TrainState) -> None:
        """Raises CheckpointError naming the first parameter (then optimizer entry) whose
        saved shape differs from the one asked for, or that only one side has."""
        problem = fit_problem(self._intact[step], abstract_state)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not fit the model and optimizer "
                f"it is restored into: {problem}; was the model config changed? "
                "The checkpoint is intact and was left as it is"
            )
