"""The device mesh and the ONE table that maps logical axis names onto it.

Models annotate parameters and activations with logical names only (``embed``, ``vocab``,
``heads``, ...). This module decides where each name lives on the ``(data, fsdp, expert,
context, tensor)`` mesh:

- ``data``: pure data parallelism (parameters replicated);
- ``fsdp``: batch split *and* parameters / optimizer state split along ``embed`` (ZeRO-3 style);
- ``expert``: expert parallelism: the experts of an MoE layer (flaxlm/models/moe.py) are
  split over it, and so is the batch (for a dense model it is one more data axis);
- ``context``: context (sequence) parallelism: activations' ``length`` is split over it, the
  rows are not; attention gathers keys/values over it inside ``shard_map``
  (flaxlm/models/context_parallel.py), and parameters are split over it as over fsdp;
- ``tensor``: Megatron-style split of attention heads, MLP hidden units and the vocabulary.

Which device sits where follows the hardware: on TPUs and GPUs ``jax.experimental.mesh_utils``
lays each slice out along its physical torus, and a multi-slice job (``mesh.dcn_data`` /
``mesh.dcn_fsdp`` > 1) puts the slices on the outer part of the data / fsdp axis, so only
that axis's collectives cross the data-center network. The axis names, and so the rules
table, are the same for one slice or many.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxlm.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# Logical name -> mesh axis (or axes, or None = replicated). Parameters and activations use
# different names because one array cannot be split twice over the same mesh axis: the batch of
# activations is already split over fsdp, so their embed dimension stays whole.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("expert", "expert"),  # the leading axis of MoE expert weights (before "embed": it wins)
    # ZeRO-3 over context and expert too: their devices hold other tokens, so they keep other
    # slices of the weights (gathered per layer, as over fsdp). Expert weights, whose leading
    # axis already takes mesh.expert, fall through to the second rule.
    ("embed", ("fsdp", "expert", "context")),
    ("embed", ("fsdp", "context")),
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
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def resolve_mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """``(data, fsdp, expert, context, tensor)``: fills the one ``-1`` axis and checks that
    the product equals ``n_devices`` and that the DCN (slice) factors divide their axes."""
    sizes = [getattr(mesh_cfg, axis) for axis in MESH_AXES]

    def described(values) -> str:
        return ", ".join(f"{a}={v}" for a, v in zip(MESH_AXES, values, strict=True))

    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n_devices % known:
            raise ConfigError(
                f"mesh ({described(sizes)}) cannot fill {n_devices} devices: {n_devices} is "
                f"not divisible by {known}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh ({described(sizes)}) has {math.prod(sizes)} devices but {n_devices} are "
            f"available; make the product {n_devices} or set one axis to -1"
        )
    for axis, size in zip(("data", "fsdp"), sizes, strict=False):
        dcn = getattr(mesh_cfg, f"dcn_{axis}")
        if size % dcn:
            raise ConfigError(
                f"mesh.dcn_{axis}={dcn} must divide the {axis} axis, of size {size} on "
                f"{n_devices} devices"
            )
    return tuple(sizes)


def build_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, expert, context, tensor)`` mesh over ``devices`` (default: all
    devices of all hosts), laid out by :func:`device_grid`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    dcn = (mesh_cfg.dcn_data, mesh_cfg.dcn_fsdp) + (1,) * (len(MESH_AXES) - 2)
    # Explicit Auto axis types: under jax.make_mesh's default (explicit) ones, flax.linen's
    # logical constraints fail ("with_sharding_constraint acts as an assert").
    return Mesh(
        device_grid(shape, dcn, devices),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def device_grid(
    shape: tuple[int, ...], dcn: tuple[int, ...], devices: Sequence[jax.Device]
) -> np.ndarray:
    """``devices`` as an array of ``shape`` whose axis ``i`` is ``dcn[i]`` slices of
    ``shape[i] // dcn[i]`` devices each (outer factor: the slice; inner: within it).

    One slice: ``mesh_utils.create_device_mesh`` (the physical torus of TPUs; GPUs by id).
    Several: ``mesh_utils.create_hybrid_device_mesh`` over the devices' ``slice_index``.
    Devices without a physical layout (CPU, simulated devices, a TPU topology of one device
    per core) keep their order: a plain reshape per slice, consecutive runs of devices
    standing for the slices when the devices name none.
    """
    ici = tuple(s // d for s, d in zip(shape, dcn, strict=True))
    n_slices = math.prod(dcn)
    named = {_dcn_granule(d) for d in devices} - {None}
    # One host-spanning slice stays allowed on GPUs (hosts then join data/fsdp in id order).
    if named and len(named) != n_slices and (n_slices > 1 or devices[0].platform != "gpu"):
        raise ConfigError(
            f"the {len(devices)} devices are in {len(named)} slice(s) but mesh.dcn_data x "
            f"mesh.dcn_fsdp = {n_slices}; make the product {len(named)}"
        )
    if n_slices == 1:
        return _slice_grid(ici, devices)
    if named and devices[0].platform == "tpu":
        try:
            return mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, allow_split_physical_axes=True
            )
        except (AssertionError, ValueError, NotImplementedError):
            pass  # no physical layout within a slice: the same blocks, below
    if named:
        slices = [[d for d in devices if _dcn_granule(d) == i] for i in sorted(named)]
    else:
        per = len(devices) // n_slices
        slices = [devices[i * per : (i + 1) * per] for i in range(n_slices)]
    grid = np.empty(shape, dtype=object)
    for devs, index in zip(slices, np.ndindex(*dcn), strict=True):
        grid[tuple(slice(i * n, (i + 1) * n) for i, n in zip(index, ici, strict=True))] = (
            _slice_grid(ici, devs)
        )
    return grid


def _dcn_granule(device: jax.Device) -> int | None:
    """What the data-center network joins: TPU slices, or hosts for GPUs (a GPU's
    ``slice_index`` does not tell hosts apart; NVLink stays within a host)."""
    if device.platform == "gpu":
        return device.process_index
    return getattr(device, "slice_index", None)


def _slice_grid(ici: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
    """One slice's devices as an array of shape ``ici``, along its physical links if any."""
    if devices[0].platform in ("tpu", "gpu"):
        try:
            return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (AssertionError, ValueError, NotImplementedError):
            pass  # e.g. a TPU topology of one device per core, or a subset with holes
    return np.asarray(devices, dtype=object).reshape(ici)


def logical_to_sharding(tree, mesh: Mesh):
    """Maps a pytree of logical ``PartitionSpec`` s to ``NamedSharding`` s on ``mesh``."""
    return nn.logical_to_mesh_sharding(tree, mesh, LOGICAL_RULES)


def check_divisible(shapes, shardings) -> None:
    """Raises ConfigError naming the first parameter whose sharding does not divide its shape
    (e.g. 4 heads over ``mesh.tensor=3``), instead of XLA's error deep inside ``jit``.

    ``shapes``: a pytree of arrays or ``ShapeDtypeStruct``; ``shardings``: NamedShardings,
    same structure.
    """
    paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
    for (path, leaf), sharding in zip(paths, jax.tree.leaves(shardings), strict=True):
        for dim, axes in enumerate(sharding.spec):
            if axes is None:
                continue
            names = axes if isinstance(axes, tuple) else (axes,)
            ways = math.prod(sharding.mesh.shape[a] for a in names)
            if leaf.shape[dim] % ways:
                split = " x ".join(f"mesh.{a}={sharding.mesh.shape[a]}" for a in names)
                raise ConfigError(
                    f"parameter {jax.tree_util.keystr(path, simple=True, separator='/')} "
                    f"{tuple(leaf.shape)}: dim {dim} ({leaf.shape[dim]}) cannot be split over "
                    f"{split}; expected mesh sizes that divide it (heads, d_ff, vocab, d_model)"
                )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batches are split over (data, fsdp) along their leading dimension (rows)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
    """A train step's ``(A, b, X)`` batch arrays: the gradient-accumulation axis whole, rows
    split over (data, fsdp)."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
