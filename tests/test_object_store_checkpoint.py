"""Checkpoints in a bucket (an S3 server and a GCS emulator on 127.0.0.1): Orbax writes into
a local folder, the sealed checkpoint is copied into the run dir with its manifest last, and
a host that does not hold a step fetches and verifies it before restoring."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import object_stores
import optax
import pytest
from flax.training.train_state import TrainState

from flaxlm import storage
from flaxlm.checkpoint.manager import Checkpointer, CheckpointError

# the servers' fixtures (tests/object_stores.py)
bucket, s3_server, gcs_server = (
    object_stores.bucket,
    object_stores.s3_server,
    object_stores.gcs_server,
)


def tiny_state(step: int) -> TrainState:
    params = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) + step, "b": jnp.ones(4)}
    state = TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))
    return state.replace(step=jnp.asarray(step, jnp.int32))


def restore(ckpt: Checkpointer, step: int | None = None):
    abstract = jax.eval_shape(lambda: tiny_state(0))
    shardings = jax.tree.map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract
    )
    return ckpt.restore(abstract, shardings, step)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A host's local cache; a new one is a host that has never seen the run."""
    monkeypatch.setenv("FLAXLM_CACHE", str(tmp_path / "host-a"))
    return tmp_path


def test_saves_to_a_bucket_and_restores_on_another_host(bucket, cache, monkeypatch):
    run = f"{bucket}/runs/r1"
    ckpt = Checkpointer(run, keep=2, asynchronous=True)
    for step in (1, 2, 3):
        ckpt.save(tiny_state(step), {"data_index": step}, b"tok")
    ckpt.close()
    assert storage.children(f"{run}/checkpoints") == ["2", "3"]  # retention, in the bucket
    assert "MANIFEST.json" in storage.walk(f"{run}/checkpoints/3")
    monkeypatch.setenv("FLAXLM_CACHE", str(cache / "host-b"))  # nothing local
    other = Checkpointer(run, asynchronous=False)
    assert other.steps() == [2, 3] and other.read_meta()["data_index"] == 3
    state, meta = restore(other)
    np.testing.assert_array_equal(state.params["w"], tiny_state(3).params["w"])
    assert meta["step"] == 3 and int(state.step) == 3
    other.close()


def test_a_damaged_step_in_the_bucket_is_walked_past(bucket, cache, monkeypatch):
    run = f"{bucket}/r2"
    ckpt = Checkpointer(run, keep=3, asynchronous=False)
    for step in (1, 2):
        ckpt.save(tiny_state(step), {}, b"tok")
    ckpt.close()
    files = storage.walk(f"{run}/checkpoints/2")
    victim = next(f for f in files if f.startswith("state/") and files[f] > 0)
    storage.write_bytes(f"{run}/checkpoints/2/{victim}", b"garbage")
    monkeypatch.setenv("FLAXLM_CACHE", str(cache / "host-b"))
    other = Checkpointer(run, asynchronous=False)
    with pytest.warns(UserWarning, match=r"checkpoint .*2 is damaged"):
        _, meta = restore(other)
    assert meta["step"] == 1 and other.walked_past == [2]
    other.close()


def test_a_failed_upload_is_one_line_and_the_older_checkpoints_stay(
    bucket, cache, capfd, monkeypatch
):
    run = f"{bucket}/r3"
    ckpt = Checkpointer(run, keep=3, asynchronous=True)
    ckpt.save(tiny_state(1), {}, b"tok")
    ckpt.wait()
    store, _ = storage.store_of(run)

    def refuse(*args, **kwargs):
        raise storage.StorageError(f"{run}/checkpoints/2/state: 403 quota exceeded")

    monkeypatch.setattr(type(store), "upload_file", refuse)
    ckpt.save(tiny_state(2), {}, b"tok")
    with pytest.raises(CheckpointError) as err:
        ckpt.wait()
    monkeypatch.undo()
    message = str(err.value)
    assert "checkpoint 2 could not be saved" in message and "quota exceeded" in message
    assert "\n" not in message and "[1]" in message
    assert "Traceback" not in capfd.readouterr().err  # nothing from the sealing thread
    assert Checkpointer(run, asynchronous=False).steps() == [1]  # no half-sealed step 2
