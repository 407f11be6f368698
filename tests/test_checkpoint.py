"""Checkpoints: exact round trips, retention, and clear errors for missing or damaged ones."""

from __future__ import annotations

import errno
import logging
import re
import shutil
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO
from flax.training.train_state import TrainState
from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler

from flaxlm.checkpoint import files as checkpoint_files
from flaxlm.checkpoint.manager import Checkpointer, CheckpointError, tokenizer_bytes_from_meta
from flaxlm.config import load_config, to_dict
from flaxlm.families import build_model
from flaxlm.parallel.sharding import build_mesh
from flaxlm.train.optim import make_optimizer
from flaxlm.train.state import abstract_state, create_state, state_shardings

# Every byte value, so base64 handling of non-UTF-8 tokenizer models is exercised.
TOKENIZER_BYTES = bytes(range(256)) * 3


@pytest.fixture(scope="module")
def setup():
    """A real tiny-GPT TrainState after one update (non-zero Adam moments), its shardings and
    abstract shapes, and the config it came from."""
    cfg = load_config(REPO / "configs" / "gpt_tiny.yaml")
    model = build_model(cfg.model)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.d_model)
    mesh = build_mesh(cfg.mesh)
    state, shardings = create_state(model, tx, mesh, cfg.data.seq_len, seed=0)
    grads = jax.tree.map(lambda p: 0.01 * p + 0.001, state.params)
    state = state.apply_gradients(grads=grads)
    abstract = abstract_state(model, tx, cfg.data.seq_len)
    return cfg, state, shardings, abstract


def at_step(state, step: int):
    """A state whose step and parameters both identify ``step``."""
    return state.replace(
        step=jax.numpy.asarray(step, state.step.dtype),
        params=jax.tree.map(lambda p: p + step, state.params),
    )


def assert_trees_equal(a, b) -> None:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = jax.device_get(x), jax.device_get(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def save_one(run_dir: Path, state, step: int = 3) -> None:
    ckpt = Checkpointer(run_dir, asynchronous=False)
    ckpt.save(at_step(state, step), {"data_index": step}, TOKENIZER_BYTES)
    ckpt.close()


def test_round_trip_is_bit_for_bit(setup, tmp_path):
    cfg, state, shardings, abstract = setup
    ckpt = Checkpointer(tmp_path, keep=3, asynchronous=True)
    saved = at_step(state, 7)
    ckpt.save(saved, {"data_index": 42, "seed": 5, "config": to_dict(cfg)}, TOKENIZER_BYTES)
    ckpt.close()  # waits for the async write

    again = Checkpointer(tmp_path)  # a fresh manager, as after a restart
    restored, meta = again.restore(abstract, shardings)
    again.close()
    assert_trees_equal(restored.params, saved.params)
    assert_trees_equal(restored.opt_state, saved.opt_state)
    assert int(restored.step) == 7
    # Arrays come back in the requested shardings.
    for got, want in zip(
        jax.tree.leaves(restored.params), jax.tree.leaves(shardings.params), strict=True
    ):
        assert got.sharding == want
    assert meta["step"] == 7
    assert meta["data_index"] == 42
    assert meta["seed"] == 5
    assert meta["config"] == to_dict(cfg)
    assert tokenizer_bytes_from_meta(meta) == TOKENIZER_BYTES


def test_keep_latest_step_and_restore_by_step(setup, tmp_path):
    _, state, shardings, abstract = setup
    ckpt = Checkpointer(tmp_path, keep=2, asynchronous=True)
    assert ckpt.latest_step() is None
    for step in (1, 2, 3, 4):
        ckpt.save(at_step(state, step), {"data_index": step}, TOKENIZER_BYTES)
    ckpt.wait()
    assert ckpt.latest_step() == 4
    ckpt.close()
    assert steps_on_disk(tmp_path) == [3, 4]

    ckpt = Checkpointer(tmp_path, keep=2)
    newest, meta = ckpt.restore(abstract, shardings)
    older, older_meta = ckpt.restore(abstract, shardings, step=3)
    assert ckpt.read_meta(3)["data_index"] == 3
    ckpt.close()
    assert (int(newest.step), meta["data_index"]) == (4, 4)
    assert (int(older.step), older_meta["data_index"]) == (3, 3)
    assert_trees_equal(older.params, at_step(state, 3).params)


def test_restore_from_an_empty_run_dir_names_the_directory(setup, tmp_path):
    _, _, shardings, abstract = setup
    ckpt = Checkpointer(tmp_path / "run", asynchronous=False)
    with pytest.raises(CheckpointError, match="no checkpoint in") as err:
        ckpt.restore(abstract, shardings)
    assert str(tmp_path / "run" / "checkpoints") in str(err.value)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        ckpt.read_meta()
    ckpt.close()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "meta deleted": lambda c: (c / "meta" / "metadata").unlink(),
    "meta truncated": lambda c: _truncate(c / "meta" / "metadata"),
    "array manifest truncated": lambda c: _truncate(c / "state" / "manifest.ocdbt"),
    "array data truncated": lambda c: [
        _truncate(p) for p in (c / "state" / "ocdbt.process_0" / "d").iterdir()
    ],
    "array data bit flipped": lambda c: [
        _flip_a_bit(p) for p in (c / "state" / "ocdbt.process_0" / "d").iterdir()
    ],
    "state folder deleted": lambda c: shutil.rmtree(c / "state"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_raises_checkpoint_error_naming_it(setup, tmp_path, damage):
    _, state, shardings, abstract = setup
    save_one(tmp_path, state, step=3)
    folder = tmp_path / "checkpoints" / "3"
    DAMAGE[damage](folder)

    ckpt = Checkpointer(tmp_path, asynchronous=False)
    assert ckpt.verify(3) is not None
    # The newest: a warning names the damaged one, then there is no older one to fall back to.
    with pytest.warns(UserWarning, match=re.escape(str(folder))):
        with pytest.raises(CheckpointError, match="no intact checkpoint") as err:
            ckpt.restore(abstract, shardings)
    assert str(folder) in str(err.value)
    # This step by name: no fallback.
    with pytest.raises(CheckpointError) as err:
        ckpt.restore(abstract, shardings, step=3)
    assert str(folder) in str(err.value)
    assert "\n" not in str(err.value)  # one line, not orbax's multi-line dump
    if damage.startswith("meta"):
        with pytest.raises(CheckpointError) as err:
            ckpt.read_meta(3)
        assert str(folder) in str(err.value)
    ckpt.close()


def test_restore_walks_back_past_a_damaged_newest_checkpoint(setup, tmp_path):
    _, state, shardings, abstract = setup
    save_one(tmp_path, state, step=3)
    save_one(tmp_path, state, step=6)
    newest = tmp_path / "checkpoints" / "6"
    DAMAGE["array data truncated"](newest)

    ckpt = Checkpointer(tmp_path, asynchronous=False)
    assert ckpt.verify(3) is None
    assert "bytes, expected" in ckpt.verify(6)
    with pytest.warns(UserWarning, match=re.escape(str(newest))):
        restored, meta = ckpt.restore(abstract, shardings)
    assert int(restored.step) == 3
    assert meta["data_index"] == 3
    assert_trees_equal(restored.params, at_step(state, 3).params)
    # What a resume may delete: exactly the damaged checkpoints it walked past.
    assert ckpt.walked_past == [6]
    ckpt.delete_after(3, only=ckpt.walked_past)
    ckpt.close()
    assert steps_on_disk(tmp_path) == [3]


def test_delete_after_only_the_named_steps(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=5, asynchronous=False)
    for step in (1, 2, 3, 4):
        ckpt.save(small_state(step), {"data_index": step}, TOKENIZER_BYTES)
    ckpt.delete_after(1, only=[2, 4])
    assert ckpt.steps() == [1, 3]
    ckpt.delete_after(1)  # a rollback: every newer one
    ckpt.close()
    assert steps_on_disk(tmp_path) == [1]


@pytest.mark.parametrize(
    "change, named",
    [
        ("model.d_model=96", "params/blocks_0/attn/key/bias is saved as (4, 16), expected (4, 24)"),
        ("model.n_layers=3", "params/blocks_2/attn/key/bias (4, 16) is not in the checkpoint"),
    ],
    ids=["d_model", "n_layers"],
)
def test_a_checkpoint_of_another_model_shape_is_an_error_not_damage(setup, tmp_path, change, named):
    """An intact checkpoint that does not fit is never walked past (a resume would delete it)."""
    cfg, state, _, _ = setup
    save_one(tmp_path, state, step=3)
    save_one(tmp_path, state, step=6)
    other = load_config(REPO / "configs" / "gpt_tiny.yaml", [change])
    model = build_model(other.model)
    tx, _ = make_optimizer(other.optim, other.train.steps, other.model.d_model)
    abstract = abstract_state(model, tx, other.data.seq_len)
    shardings = state_shardings(model, tx, build_mesh(other.mesh), other.data.seq_len)

    ckpt = Checkpointer(tmp_path, asynchronous=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "damaged" warning, no walking back
        with pytest.raises(CheckpointError, match="does not fit the model") as err:
            ckpt.restore(abstract, shardings)
    message = str(err.value)
    assert str(tmp_path / "checkpoints" / "6") in message and named in message
    assert "\n" not in message
    assert ckpt.walked_past == []
    ckpt.close()
    assert steps_on_disk(tmp_path) == [3, 6]
    assert ckpt.verify(6) is None


def test_io_errors_are_retried_then_one_line_and_nothing_is_walked_past(
    setup, tmp_path, monkeypatch
):
    _, state, shardings, abstract = setup
    save_one(tmp_path, state, step=3)
    save_one(tmp_path, state, step=6)
    monkeypatch.setattr(checkpoint_files, "IO_BACKOFF_S", 0.0)
    real_restore = Checkpointer._restore_step
    failures = {"left": 2}

    def flaky(self, *args):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_restore(self, *args)

    monkeypatch.setattr(Checkpointer, "_restore_step", flaky)
    ckpt = Checkpointer(tmp_path, asynchronous=False)
    restored, _ = ckpt.restore(abstract, shardings)  # two failures, then the third try reads
    assert int(restored.step) == 6 and failures["left"] == 0

    # A disk that keeps failing, while reading the arrays or while checking the checksums.
    failures["left"] = checkpoint_files.IO_ATTEMPTS
    with pytest.raises(CheckpointError, match="I/O error reading checkpoint") as err:
        ckpt.restore(abstract, shardings)
    assert "Input/output error" in str(err.value) and "\n" not in str(err.value)

    def broken_disk(path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(checkpoint_files, "_sha256", broken_disk)
    fresh = Checkpointer(tmp_path, asynchronous=False)  # nothing verified yet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match="I/O error checking checkpoint .*6"):
            fresh.restore(abstract, shardings)
    assert fresh.walked_past == []
    fresh.close()
    ckpt.close()
    assert steps_on_disk(tmp_path) == [3, 6]


def small_state(step: int) -> TrainState:
    """A few numbers with an optimizer: retention and save errors need no model."""
    state = TrainState.create(apply_fn=None, params={"w": jnp.arange(4.0)}, tx=optax.sgd(0.1))
    return state.replace(step=jnp.asarray(step, jnp.int32))


def test_keep_n_keeps_the_newest_n_plus_the_protected_ones(tmp_path):
    """keep=5 once kept 2: the slice of "the newest keep-1" went negative for 3 checkpoints."""
    ckpt = Checkpointer(tmp_path, keep=5, asynchronous=False)
    for step in range(10, 90, 10):
        # As the trainer does: the newest known-good (10 here) and the candidates.
        protect = {10, step - 10} if step > 10 else set()
        ckpt.save(small_state(step), {"data_index": step}, TOKENIZER_BYTES, protect=protect)
        newest = list(range(max(10, step - 40), step + 10, 10))
        assert ckpt.steps() == sorted({10, *newest}), step
    ckpt.close()
    assert steps_on_disk(tmp_path) == [10, 40, 50, 60, 70, 80]


def test_retention_spares_protected_steps(setup, tmp_path):
    _, state, _, _ = setup
    ckpt = Checkpointer(tmp_path, keep=2, asynchronous=False)
    for step in (1, 2, 3, 4):
        ckpt.save(at_step(state, step), {"data_index": step}, TOKENIZER_BYTES, protect={1})
    ckpt.close()
    assert steps_on_disk(tmp_path) == [1, 3, 4]


def test_a_half_written_save_is_ignored(setup, tmp_path):
    """Orbax writes into ``<step>.orbax-checkpoint-tmp...`` and renames it when complete, then
    the manifest is written; a crash before either leaves a folder that must not count."""
    _, state, shardings, abstract = setup
    save_one(tmp_path, state, step=3)
    checkpoints = tmp_path / "checkpoints"
    for name in ("5.orbax-checkpoint-tmp", "6.orbax-checkpoint-tmp-1712345678"):
        shutil.copytree(checkpoints / "3", checkpoints / name)
        shutil.rmtree(checkpoints / name / "state" / "ocdbt.process_0")

    # Orbax renamed it into place, but the manifest (written last) is missing.
    (checkpoints / "9" / "state").mkdir(parents=True)

    ckpt = Checkpointer(tmp_path, asynchronous=False)
    assert ckpt.latest_step() == 3
    assert ckpt.steps() == [3]
    restored, meta = ckpt.restore(abstract, shardings)
    ckpt.close()
    assert int(restored.step) == 3
    assert meta["data_index"] == 3


def test_leftovers_of_killed_saves_are_removed_at_the_first_save(tmp_path):
    ckpt = Checkpointer(tmp_path, asynchronous=False)
    ckpt.save(small_state(3), {"data_index": 3}, TOKENIZER_BYTES)
    ckpt.close()
    checkpoints = tmp_path / "checkpoints"
    leftovers = ["5.orbax-checkpoint-tmp", "6.orbax-checkpoint-tmp-1712345678", "9"]
    for name in leftovers:
        (checkpoints / name / "state").mkdir(parents=True)

    reader = Checkpointer(tmp_path, asynchronous=False)  # eval while a trainer may be saving
    assert reader.read_meta()["step"] == 3
    reader.close()
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(["3", *leftovers])

    writer = Checkpointer(tmp_path, asynchronous=True)
    writer.save(small_state(4), {"data_index": 4}, TOKENIZER_BYTES)
    writer.save(small_state(5), {"data_index": 5}, TOKENIZER_BYTES)  # 4 in flight: kept
    writer.close()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["3", "4", "5"]


def _disk_full(monkeypatch) -> None:
    """Orbax's write of the JSON item fails as on a full disk (in its background thread when
    the save is asynchronous)."""

    async def no_space(self, item, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", no_space)


# The injected failure ends Orbax's event loop while its array write is still pending, which
# Python reports as an unraisable "Event loop is closed" (a real full disk fails the arrays).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_full_disk_is_one_line_and_the_previous_checkpoints_stay(
    tmp_path, monkeypatch, caplog, asynchronous
):
    ckpt = Checkpointer(tmp_path, keep=3, asynchronous=asynchronous)
    for step in (1, 2):
        ckpt.save(small_state(step), {"data_index": step}, TOKENIZER_BYTES)
    ckpt.wait()
    _disk_full(monkeypatch)
    with pytest.raises(CheckpointError) as err, caplog.at_level(logging.ERROR):
        ckpt.save(small_state(3), {"data_index": 3}, TOKENIZER_BYTES)
        ckpt.wait()  # an asynchronous save fails in the background: the next wait raises
    message = str(err.value)
    assert isinstance(err.value, RuntimeError)  # the CLI prints it as one line
    assert message.startswith("the disk is full: checkpoint 3 could not be saved in ")
    assert str(tmp_path) in message and "\n" not in message
    # Orbax's own tracebacks of the failure are not logged.
    assert not [r for r in caplog.records if r.exc_info]
    monkeypatch.undo()
    ckpt.close()  # the error was raised once; closing is quiet
    assert ckpt.steps() == [1, 2] and [ckpt.verify(s) for s in (1, 2)] == [None, None]
    # The next start (space freed) removes the half-written folder and saves again.
    again = Checkpointer(tmp_path, asynchronous=False)
    again.save(small_state(3), {"data_index": 3}, TOKENIZER_BYTES)
    again.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2", "3"]


def test_an_asynchronous_save_is_sealed_without_waiting_for_the_next_one(tmp_path):
    # A kill after an asynchronous save finished, but before the next save or wait(), must
    # find that checkpoint complete (issue 14): the sealing thread writes its manifest.
    ckpt = Checkpointer(tmp_path, keep=3, asynchronous=True)
    ckpt.save(small_state(7), {}, b"tok")
    deadline = time.monotonic() + 30
    while ckpt.steps() != [7] and time.monotonic() < deadline:
        time.sleep(0.02)  # no wait(), no further save: only the sealing thread can seal it
    assert ckpt.steps() == [7]
    assert Checkpointer(tmp_path).verify(7) is None  # what a fresh process would find
    ckpt.close()
