"""Loading a trained model back from a run directory or one of its checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import yaml
from flax import linen as nn
from jax.sharding import Mesh

from flaxlm import storage
from flaxlm.checkpoint.manager import Checkpointer, CheckpointError, tokenizer_bytes_from_meta
from flaxlm.config import Config, MeshConfig, from_dict, to_dict
from flaxlm.families import build_model
from flaxlm.parallel.sharding import build_mesh
from flaxlm.tokenizers.sentencepiece import Tokenizer, check_vocab
from flaxlm.train.optim import make_optimizer
from flaxlm.train.state import abstract_state, state_shardings


@dataclass
class LoadedModel:
    cfg: Config
    model: nn.Module
    params: Any
    tokenizer: Tokenizer
    step: int
    mesh: Mesh
    params_sharding: Any
    meta: dict[str, Any]


def resolve_checkpoint(path: str | Path) -> tuple[Path | str, int | None]:
    """``RUN_DIR`` -> (run dir, None = newest); ``RUN_DIR/checkpoints/N`` -> (run dir, N).
    A run dir in a bucket stays a URL (str); a local one is a Path."""
    path = str(path).rstrip("/")
    if storage.exists(storage.join(path, "checkpoints")):
        return storage.native(path), None
    parent, name = storage.parent_of(path), storage.name_of(path)
    if storage.name_of(parent) == "checkpoints" and name.isdigit() and storage.exists(path):
        return storage.native(storage.parent_of(parent)), int(name)
    raise CheckpointError(
        f"{str(path)!r} is neither a run directory (with checkpoints/) "
        "nor a checkpoint RUN_DIR/checkpoints/<step>"
    )


def load_checkpoint(path: str | Path, mesh_cfg: MeshConfig | None = None) -> LoadedModel:
    """Restores the parameters, config and tokenizer of a run's newest (or a given) checkpoint.

    From a run dir, damaged newer checkpoints (checksum mismatch, unreadable metadata) are
    skipped with a warning naming each, as a resume does; a damaged checkpoint named by path
    is a CheckpointError saying what is wrong. The mesh defaults to pure data parallelism
    over all local devices, whatever mesh the run was trained on: Orbax reshards on restore.
    """
    run_dir, step = resolve_checkpoint(path)
    ckpt = Checkpointer(run_dir, asynchronous=False)
    try:
        step = ckpt.newest_intact() if step is None else ckpt.check_intact(step)
        meta = ckpt.read_meta(step)
        cfg = from_dict(meta["config"], check_paths=False)
        cfg.mesh = mesh_cfg or MeshConfig()
        mesh = build_mesh(cfg.mesh)
        model = build_model(cfg.model)
        tx, _ = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.d_model)
        state_sh = state_shardings(model, tx, mesh, cfg.data.seq_len)
        abstract = abstract_state(model, tx, cfg.data.seq_len)
        state, meta = ckpt.restore(abstract, state_sh, step)
    finally:
        ckpt.close()
    tokenizer = Tokenizer.from_bytes(tokenizer_bytes_from_meta(meta))
    return LoadedModel(
        cfg=cfg,
        model=model,
        params=state.params,
        tokenizer=tokenizer,
        step=int(jax.device_get(state.step)),
        mesh=mesh,
        params_sharding=state_sh.params,
        meta=meta,
    )


def save_params_checkpoint(
    run_dir: str | Path, cfg: Config, params: Any, tokenizer: Tokenizer, step: int = 0
) -> Path | str:
    """Writes ``params`` as checkpoint ``step`` of a run dir (fresh optimizer state, data
    position ``step``), with ``config.yaml`` and ``tokenizer.model`` beside it, so that
    :func:`load_checkpoint`, ``flaxlm eval``/``generate`` and ``flaxlm train`` (fine-tuning
    from these weights) read it like any run. Returns the checkpoint folder.
    """
    from flax.training.train_state import TrainState

    check_vocab(tokenizer, cfg.model.vocab_size)
    run_dir = str(run_dir)  # a folder or a bucket URL (flaxlm.storage)
    cfg.train.run_dir = run_dir
    storage.make_dirs(run_dir)
    model = build_model(cfg.model)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.d_model)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    state = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32))
    config = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    storage.write_text(storage.join(run_dir, "config.yaml"), config)
    storage.write_bytes(storage.join(run_dir, "tokenizer.model"), tokenizer.model_bytes)
    ckpt = Checkpointer(run_dir, asynchronous=False)
    try:
        meta = {"data_index": step, "seed": cfg.train.seed, "config": to_dict(cfg)}
        ckpt.save(state, meta, tokenizer.model_bytes)
        ckpt.wait()
    finally:
        ckpt.close()
    return storage.native(storage.join(run_dir, "checkpoints", str(step)))
