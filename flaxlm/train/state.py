"""The train state and its sharded creation.

The state is initialised *inside* ``jit`` with ``out_shardings`` taken from the model's
logical axis names, so each device only ever materialises its own shard of the parameters
and optimizer state — no host holds the full model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training.train_state import TrainState
from jax.sharding import Mesh

from flaxlm.parallel.sharding import LOGICAL_RULES, check_divisible, logical_to_sharding, replicated


def _init_variables(model: nn.Module, seq_len: int, rng: jax.Array):
    tokens_1xL = jnp.zeros((1, seq_len), jnp.int32)
    return model.init({"params": rng, "dropout": rng}, tokens_1xL)


def param_shardings(model: nn.Module, mesh: Mesh, seq_len: int) -> Any:
    """NamedShardings for the (unboxed) params tree, from the logical names on each param."""
    boxed = jax.eval_shape(lambda r: _init_variables(model, seq_len, r), jax.random.key(0))
    specs = nn.get_partition_spec(boxed)["params"]
    shardings = logical_to_sharding(specs, mesh)
    check_divisible(nn.meta.unbox(boxed)["params"], shardings)
    return shardings


def _opt_state_shardings(opt_state_shape: Any, params_sh: Any, params_shape: Any, mesh: Mesh):
    """Optimizer moments are sharded like the parameter they belong to; scalars replicated.

    Optax states mirror the params tree (``mu``, ``nu``, ...), so a leaf whose key path ends
    with a parameter's key path and has the parameter's shape takes that parameter's sharding.
    """
    by_path = {}
    for (path, sh), (_, shape) in zip(
        jax.tree_util.tree_flatten_with_path(params_sh)[0],
        jax.tree_util.tree_flatten_with_path(params_shape)[0],
        strict=True,
    ):
        by_path[tuple(path)] = (sh, shape.shape)
    everywhere = replicated(mesh)

    def pick(path, leaf):
        path = tuple(path)
        for n in range(len(path), 0, -1):
            hit = by_path.get(path[-n:])
            if hit is not None and hit[1] == leaf.shape:
                return hit[0]
        return everywhere

    return jax.tree_util.tree_map_with_path(pick, opt_state_shape)


def state_shardings(
    model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, seq_len: int
) -> TrainState:
    """A TrainState-shaped tree of NamedShardings (what jit's in/out_shardings take)."""
    params_sh = param_shardings(model, mesh, seq_len)
    abstract = abstract_state(model, tx, seq_len)
    opt_sh = _opt_state_shardings(abstract.opt_state, params_sh, abstract.params, mesh)
    return abstract.replace(step=replicated(mesh), params=params_sh, opt_state=opt_sh)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int) -> TrainState:
    """The state's shapes and dtypes, without allocating anything."""
    return jax.eval_shape(lambda r: _create(model, tx, seq_len, r), jax.random.key(0))


def _create(model: nn.Module, tx: optax.GradientTransformation, seq_len: int, rng: jax.Array):
    params = nn.meta.unbox(_init_variables(model, seq_len, rng)["params"])
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    # A strongly typed int32 step, as a restored one is: a weak-typed 0 made the train step
    # compile again after every rollback (and once more per batch size under a batch ramp).
    return state.replace(step=jnp.zeros((), jnp.int32))


def create_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    seq_len: int,
    seed: int,
    shardings: TrainState | None = None,
) -> tuple[TrainState, TrainState]:
    """Initialises the state directly into its shards. Returns (state, state_shardings)."""
    if shardings is None:
        shardings = state_shardings(model, tx, mesh, seq_len)
    init = jax.jit(
        lambda r: _create(model, tx, seq_len, r),
        out_shardings=shardings,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state = init(jax.random.key(seed))
    return state, shardings
