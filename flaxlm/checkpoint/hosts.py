"""Checkpoints written by several hosts into folders of their own (no shared file system).

On a TPU pod or a cloud GPU cluster each host has its own disk and the run dir is a bucket.
Orbax's usual multi-process save merges every host's arrays in one folder that all hosts
share; here each host runs Orbax as its own primary (``primary_host=None``) and writes a
complete folder of its own part: all the metadata, and one copy of every array shard it
holds. The zarr layout (not OCDBT) keeps the parts mergeable: every shard is a file of its
own, so the union of the hosts' folders is the whole checkpoint, readable by any number of
hosts. Files every host writes (the metadata) are the same on each, except for timestamps;
process 0's copy is the one kept.

The hosts agree through the JAX distributed runtime's key-value store (:func:`exchange`),
not device collectives, so the sealing thread can agree while the devices train.

    part = host_part(layout_of(state))           # this host's index, count and shard layout
    values = exchange("steps", json.dumps(mine))  # every host's value, in process order
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

EXCHANGE_TIMEOUT_MS = 30 * 60 * 1000  # a host this late has failed; the runtime says so first
_calls: Counter[str] = Counter()  # how often this process exchanged each topic (the key)


def per_host() -> bool:
    """Whether checkpoints are written by several processes into folders of their own."""
    return jax.process_count() > 1


def exchange(topic: str, value: str) -> list[str]:
    """Every process's ``value`` for this call of ``topic``, in process order. Every process
    must make the same calls in the same order (each key is used once); one process alone
    gets ``[value]`` without a runtime."""
    if jax.process_count() == 1:
        return [value]
    # The JAX distributed client; Orbax reaches it the same way (no public accessor yet).
    from jax._src import distributed

    client = distributed.global_state.client
    n = _calls[topic]
    _calls[topic] += 1
    key = f"flaxlm/{topic}/{n}"
    client.key_value_set(f"{key}/{jax.process_index()}", value)
    return [
        client.blocking_key_value_get(f"{key}/{i}", EXCHANGE_TIMEOUT_MS)
        for i in range(jax.process_count())
    ]


def first_problem(topic: str, problem: str | None) -> str | None:
    """The first host's problem (``on host i: ...`` with several hosts), or None when no
    host has one: every host gets the same answer."""
    said = exchange(topic, problem or "")
    for i, text in enumerate(said):
        if text:
            return text if len(said) == 1 else f"on host {i}: {text}"
    return None


def layout_of(arrays: Any, shardings: Any = None) -> str:
    """A fingerprint of which shards of every array this host holds: a host's own part of a
    checkpoint serves a restore only into the same layout. ``arrays`` are jax Arrays or
    ShapeDtypeStructs; ``shardings`` (the same tree) default to theirs."""
    if shardings is None:
        shardings = jax.tree.map(lambda a: a.sharding, arrays)
    held = jax.tree.map(
        lambda a, s: sorted({str(i) for i in s.addressable_devices_indices_map(a.shape).values()}),
        arrays,
        shardings,
    )
    text = json.dumps(jax.tree.leaves(held, is_leaf=lambda x: isinstance(x, list)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def host_part(layout: str) -> dict[str, Any]:
    """What a part manifest records of the host that wrote it: its index, the number of
    hosts, and its shard layout (:func:`layout_of`)."""
    return {"index": jax.process_index(), "count": jax.process_count(), "layout": layout}


def part_problem(saved: dict[str, Any], layout: str | None) -> str | None:
    """None if a folder holding the part ``saved`` (:func:`host_part`) serves a restore on
    this host (into ``layout``, when known), else why not."""
    here = host_part(layout or saved["layout"])
    if (saved["index"], saved["count"]) != (here["index"], here["count"]):
        return (
            f"it holds host {saved['index']} of {saved['count']}'s part only "
            f"(this is host {here['index']} of {here['count']})"
        )
    if saved["layout"] != here["layout"]:
        return "it holds this host's shards of another layout (a changed mesh) only"
    return None


def orbax_items() -> tuple[dict[str, Any], ocp.options.MultiprocessingOptions]:
    """Orbax's item handlers and options for a folder of this host's own: every host its own
    primary, zarr files, one copy of each shard this host holds (not only replica 0's)."""
    options = ocp.options.MultiprocessingOptions(primary_host=None)
    registry = ocp.type_handlers.create_type_handler_registry(
        (
            jax.Array,
            ocp.type_handlers.ArrayHandler(
                primary_host=None, replica_id=None, use_replica_parallel=False
            ),
        )
    )
    handlers = {
        "state": ocp.PyTreeCheckpointHandler(
            use_ocdbt=False, multiprocessing_options=options, type_handler_registry=registry
        ),
        "meta": ocp.JsonCheckpointHandler(multiprocessing_options=options),
    }
    return handlers, options


def save_args(state: Any, meta: dict[str, Any], own_folders: bool) -> ocp.args.Composite:
    if own_folders:
        return ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def restore_args(target: Any, own_folders: bool) -> ocp.args.Composite:
    if own_folders:
        state = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
        )
    else:
        state = ocp.args.StandardRestore(target)
    return ocp.args.Composite(state=state, meta=ocp.args.JsonRestore())


def merge_parts(step: int, parts: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """The manifest of the whole checkpoint from every host's part manifest (process order),
    and the files of process 0 whose copies on other hosts differ (the metadata's timestamps):
    process 0's copy is kept, uploaded again after the others'. Raises ValueError for a file
    that other hosts hold in different copies and process 0 does not hold."""
    files: dict[str, list] = {}
    differ = set()
    for part in parts:
        for rel, entry in part["files"].items():
            if rel not in files:
                files[rel] = entry
            elif files[rel] != entry:
                if rel not in parts[0]["files"]:
                    raise ValueError(f"the hosts hold different copies of {rel}")
                differ.add(rel)
    return {"step": step, "files": files}, sorted(differ)


def orbax_manager(directory: Path, asynchronous: bool, own_folders: bool) -> ocp.CheckpointManager:
    """Orbax's manager of ``directory``: retention is ours (it must spare the known-good
    checkpoint); with ``own_folders`` every host writes its own part into its own folder."""
    if not own_folders:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, enable_async_checkpointing=asynchronous, create=True
        )
        return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
    handlers, multiprocessing = orbax_items()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        enable_async_checkpointing=asynchronous,
        create=True,
        multiprocessing_options=multiprocessing,
        enable_per_process_directory_creation=True,
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


class _QuietOwnFolders(logging.Filter):
    """Orbax warns on every save of a host's own folder that it found no OCDBT files to merge
    and logs no global sizes: both are this layout's design, not a problem."""

    EXPECTED = ("Skipping merge of OCDBT checkpoints", "Global object size logging disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in self.EXPECTED)


logging.getLogger("absl").addFilter(_QuietOwnFolders())
