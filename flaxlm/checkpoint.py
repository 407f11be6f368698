"""Orbax checkpoints of a run: ``RUN_DIR/checkpoints/<step>/{state,meta}``.

``state`` is the sharded TrainState (params, optimizer state, step). ``meta`` is JSON: the
data position, the seed (the dropout RNG is a pure function of seed and step, so it needs no
state of its own), the resolved config and the tokenizer model, so a checkpoint alone is
enough to evaluate or sample. Saves are asynchronous: ``save`` returns once the arrays are
copied off the devices; Orbax writes into a temporary folder and renames it when complete, so
a crash mid-save never damages an existing checkpoint.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax.training.train_state import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be read; the message names it."""


class Checkpointer:
    """Saves and restores the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep: int = 3, asynchronous: bool = True):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=asynchronous,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState, meta: dict[str, Any], tokenizer_bytes: bytes) -> None:
        """Starts saving ``state`` at ``state.step``; returns before the write finishes."""
        step = int(jax.device_get(state.step))
        meta = dict(meta, step=step, tokenizer_b64=base64.b64encode(tokenizer_bytes).decode())
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(
        self, abstract_state: TrainState, state_sh: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restores ``step`` (default: the newest) into the given shardings.

        Passing the target shardings is what lets a checkpoint written on one mesh (or by N
        processes) load onto another.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            state_sh,
        )
        restored = self._restore(
            step,
            ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["meta"])

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of a checkpoint, without touching its arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        restored = self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def _restore(self, step: int, args: ocp.args.Composite) -> Any:
        try:
            return self._manager.restore(step, args=args)
        except Exception as exc:  # orbax raises many types; name the checkpoint either way
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc

    def wait(self) -> None:
        """Blocks until every started save is durable on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def tokenizer_bytes_from_meta(meta: dict[str, Any]) -> bytes:
    return base64.b64decode(meta["tokenizer_b64"])
