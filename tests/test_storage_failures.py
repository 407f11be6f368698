"""A save that fails in the background (a full disk while the sealing thread writes the
manifest) ends as one line from the next wait, with no traceback from the thread, the older
checkpoints intact and nothing half sealed."""

from __future__ import annotations

import errno

import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

from flaxlm.checkpoint import manager
from flaxlm.checkpoint.manager import MANIFEST, Checkpointer, CheckpointError


def tiny_state(step: int) -> TrainState:
    state = TrainState.create(apply_fn=None, params={"w": jnp.ones(8) * step}, tx=optax.sgd(0.1))
    return state.replace(step=jnp.asarray(step, jnp.int32))


def test_a_full_disk_in_the_sealing_thread_is_one_line_without_a_traceback(
    tmp_path, monkeypatch, capfd
):
    ckpt = Checkpointer(tmp_path, keep=3, asynchronous=True)
    ckpt.save(tiny_state(1), {}, b"tok")
    ckpt.wait()
    sealed = manager.write_manifest

    def full(folder, step, host=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / MANIFEST))

    monkeypatch.setattr(manager, "write_manifest", full)
    ckpt.save(tiny_state(2), {}, b"tok")  # Orbax writes; the sealing thread fails
    try:
        ckpt.wait()
        raise AssertionError("the failed save was not reported")
    except CheckpointError as err:
        message = str(err)
    assert message.startswith("the disk is full: checkpoint 2 could not be saved in ")
    assert "\n" not in message and "intact ([1])" in message
    assert "Traceback" not in capfd.readouterr().err
    monkeypatch.setattr(manager, "write_manifest", sealed)
    assert ckpt.steps() == [1]  # 2 is not sealed, so it does not count
    ckpt.save(tiny_state(3), {}, b"tok")  # space again: the leftover of 2 goes
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "3"]
