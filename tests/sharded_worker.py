"""Run by the sharding tests in a fresh process with 8 simulated CPU devices.

python tests/sharded_worker.py gpt|bert CORPUS CACHE RUN_ROOT OUT_JSON MESH... [OVERRIDE...]

Trains the tiny GPT or BERT once per MESH (``data,fsdp,tensor[,expert]``, e.g. ``2,2,2``) into
``RUN_ROOT/run_name(MESH)`` with the config overrides given (the other arguments), and writes
each run's history, evals and number of sharded parameter dimensions to OUT_JSON. A MESH may
carry overrides of its own after colons: ``1,4,2:train.head_chunk=8``.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from conftest import bert_tiny_config, tiny_config  # noqa: E402

from flaxlm.families import build_model  # noqa: E402
from flaxlm.parallel.sharding import LOGICAL_RULES, build_mesh  # noqa: E402
from flaxlm.train import train  # noqa: E402
from flaxlm.train.optim import make_optimizer  # noqa: E402
from flaxlm.train.state import create_state  # noqa: E402

CONFIGS = {"gpt": tiny_config, "bert": bert_tiny_config}


def is_mesh(arg: str) -> bool:
    """Whether ``arg`` is a MESH (``2,2,2`` or ``1,4,2:OVERRIDE...``), not an override."""
    return all(part.isdigit() for part in arg.split(":")[0].split(","))


def run_name(mesh: str) -> str:
    """The run folder of ``mesh`` under RUN_ROOT: ``2x2x2``, ``1x4x2+train.head_chunk=8``."""
    return mesh.replace(",", "x").replace(":", "+")


def expected_spec(names: tuple) -> tuple:
    """The mesh axes of each logical name: the first rule for it whose mesh axes no earlier
    dimension of the same array has taken (so MoE expert weights, whose leading axis takes
    mesh.expert, fall through to the ``embed`` rule without it)."""
    taken: set[str] = set()
    out = []
    for name in names:
        choice = None
        for logical, axes in LOGICAL_RULES if name is not None else ():
            group = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if logical == name and not taken & set(group):
                choice, taken = axes, taken | set(group)
                break
        out.append(choice)
    return tuple(out)


def check_param_shardings(cfg) -> int:
    """Every parameter (and its Adam moments) is laid out exactly as the rules table says.

    Returns how many (parameter, dimension) pairs are split over more than one device.
    """
    mesh = build_mesh(cfg.mesh)
    model = build_model(cfg.model)
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.d_model)
    state, _ = create_state(model, tx, mesh, cfg.data.seq_len, cfg.train.seed)
    boxed = jax.eval_shape(
        lambda r: model.init({"params": r}, np.zeros((1, cfg.data.seq_len), np.int32)),
        jax.random.key(0),
    )["params"]
    names = jax.tree.leaves(
        nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    sharded = 0
    mu = state.opt_state[-1][0].mu  # clip_by_global_norm, then adamw's ScaleByAdamState
    for spec, param, moment in zip(
        names, jax.tree.leaves(state.params), jax.tree.leaves(mu), strict=True
    ):
        expected = expected_spec(spec)
        actual = tuple(param.sharding.spec) + (None,) * (param.ndim - len(param.sharding.spec))
        assert actual == expected, (spec, actual, expected)
        assert moment.sharding.spec == param.sharding.spec, (spec, moment.sharding.spec)
        shard_shape = param.addressable_shards[0].data.shape
        for dim, axes in enumerate(expected):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            split = math.prod(mesh.shape[a] for a in axes)
            assert shard_shape[dim] == param.shape[dim] // split, (spec, shard_shape)
            sharded += split > 1
    return sharded


def main() -> None:
    family, corpus, cache, run_root, out, *rest = sys.argv[1:]
    overrides = [a for a in rest if not is_mesh(a)]
    meshes = [a for a in rest if is_mesh(a)]
    assert jax.device_count() == 8
    # check_param_shardings and train compile the same init: the second one becomes a cache
    # hit (in the test session's cache, which conftest.py names in the environment).
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(Path(run_root) / "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    results = {}
    for mesh in meshes:
        shape, *own = mesh.split(":")
        data, fsdp, tensor, *expert = shape.split(",")  # "d,f,t" or "d,f,t,e"
        cfg = CONFIGS[family](
            Path(corpus),
            Path(cache),
            Path(run_root) / run_name(mesh),
            *overrides,
            *own,
            f"mesh.data={data}",
            f"mesh.fsdp={fsdp}",
            f"mesh.tensor={tensor}",
            f"mesh.expert={expert[0] if expert else 1}",
        )
        n_sharded = check_param_shardings(cfg)
        result = train(cfg)
        results[mesh] = {"history": result.history, "evals": result.evals, "sharded": n_sharded,
                         "run_dir": str(cfg.train.run_dir)}  # fmt: skip
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
