"""The device mesh and the ONE table that maps logical axis names onto it.

Models annotate parameters and activations with logical names only (``embed``, ``vocab``,
``heads``, ...). This module decides where each name lives on the ``(data, fsdp, tensor)`` mesh:

- ``data``: pure data parallelism (parameters replicated);
- ``fsdp``: batch split *and* parameters / optimizer state split along ``embed`` (ZeRO-3 style);
- ``tensor``: Megatron-style split of attention heads, MLP hidden units and the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxlm.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or axes, or None = replicated). Parameters and activations use
# different names because one array cannot be split twice over the same mesh axis: the batch of
# activations is already split over fsdp, so their embed dimension stays whole.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("position", None),
    ("norm", None),
    ("layers", None),
    ("embed_out", None),  # the output side of a d_model x d_model head (BERT pooler, MLM transform)
    ("types", None),  # BERT token-type (segment A/B) embedding rows
    ("classes", None),  # NSP / classifier outputs
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def resolve_mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Fills the one ``-1`` axis and checks that the product equals ``n_devices``."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n_devices % known:
            raise ConfigError(
                f"mesh (data={mesh_cfg.data}, fsdp={mesh_cfg.fsdp}, tensor={mesh_cfg.tensor}) "
                f"cannot fill {n_devices} devices: {n_devices} is not divisible by {known}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) has "
            f"{math.prod(sizes)} devices but {n_devices} are available; make the product "
            f"{n_devices} or set one axis to -1"
        )
    return sizes[0], sizes[1], sizes[2]


def build_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    # Explicit Auto axis types: under jax.make_mesh's default (explicit) ones, flax.linen's
    # logical constraints fail ("with_sharding_constraint acts as an assert").
    return Mesh(
        np.asarray(devices).reshape(shape),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def logical_to_sharding(tree, mesh: Mesh):
    """Maps a pytree of logical ``PartitionSpec`` s to ``NamedSharding`` s on ``mesh``."""
    return nn.logical_to_mesh_sharding(tree, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batches are split over (data, fsdp) along their leading dimension (rows)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
    """A train step's ``(A, b, X)`` batch arrays: the gradient-accumulation axis whole, rows
    split over (data, fsdp)."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
