"""Expert-parallel MoE dispatch (flaxlm/models/moe_dispatch.py): on 8 simulated CPU devices the
layer under a mesh (the ``expert`` axis alone and combined with ``data``, ``fsdp``, ``tensor``)
gives the 1-device layer's outputs, auxiliary losses, routing statistics and gradients, dropless
and with a capacity; a receive buffer below the worst case drops (and counts) exactly the
overflow; the TPU path (``ragged_all_to_all``) compiles for a real TPU topology.

The 8-device part runs this file as a script in a fresh process (the device count is fixed at
the first use of jax); the 1-device layer itself is checked against a NumPy per-token loop in
tests/test_moe.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

MESHES = (  # all other axes 1
    {"expert": 8},
    {"data": 2, "fsdp": 2, "expert": 2},
    {"fsdp": 2, "expert": 2, "tensor": 2},
)


def _mesh(devices, sizes: dict[str, int]):
    """A mesh over ``devices`` with the named axis sizes (the others 1)."""
    import numpy as np
    from jax.sharding import Mesh

    from flaxlm.parallel.sharding import MESH_AXES

    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def _layer_and_grads(capacity_factor: float, shared: int = 0, buffer_factor: float = 0.0):
    """The layer's loss, MoE statistics and gradients as a jitted function of (params, x)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from flaxlm.config import ModelConfig, MoEConfig
    from flaxlm.models.moe import MoEMLP, collect

    moe = MoEConfig(num_experts=8, top_k=2, capacity_factor=capacity_factor,
                    shared_experts=shared, d_expert=12, buffer_factor=buffer_factor)  # fmt: skip
    cfg = ModelConfig(d_model=16, d_ff=24, n_layers=2, activation="swiglu", moe=moe)
    layer = MoEMLP(cfg)

    def loss(params, x):
        y, state = layer.apply({"params": params}, x, mutable=["moe"])
        stats = collect(state)
        return jnp.sum(y * jnp.cos(y)) + stats["aux_loss"], (y, stats)

    def init(x):
        params = nn.meta.unbox(layer.init(jax.random.key(1), x))["params"]
        return jax.tree.map(lambda p: p * 3.0, params)  # a router far from uniform

    return jax.jit(jax.value_and_grad(loss, has_aux=True)), init


def _worker() -> None:
    """Each mesh's results equal the no-mesh ones (run with 8 simulated devices)."""
    import jax
    import numpy as np
    from flax import linen as nn

    from flaxlm.parallel.sharding import LOGICAL_RULES

    x = jax.random.normal(jax.random.key(0), (16, 6, 16))
    for factor, shared in ((0.0, 0), (0.5, 1)):  # dropless; capacity + a shared expert
        step, init = _layer_and_grads(factor, shared)
        params = init(x)
        want = step(params, x)
        for shape in MESHES:
            with jax.set_mesh(_mesh(jax.devices(), shape)), nn.logical_axis_rules(LOGICAL_RULES):
                got = step(params, x)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=f"{shape} {factor}")
        dropped = float(want[0][1][1]["dropped"])
        assert (dropped > 0) == (factor > 0), (factor, dropped)
    _check_receive_buffer(x)
    print("ok")


def _check_receive_buffer(x) -> None:
    """``buffer_factor`` 1 on expert 8 (one expert per device): each device receives at most
    its own 24 pairs' worth; the overflow is dropped. Device 0's blocks land first, so its
    tokens lose nothing and equal the dropless 1-device layer; the count dropped is
    sum_j max(0, pairs routed to expert j - 24), from the router's choices in NumPy."""
    import jax
    import numpy as np
    from flax import linen as nn

    from flaxlm.parallel.sharding import LOGICAL_RULES

    step, init = _layer_and_grads(0.0, buffer_factor=1.0)
    params = init(x)
    (_, (want_y, _)), _ = step(params, x)
    with jax.set_mesh(_mesh(jax.devices(), {"expert": 8})), nn.logical_axis_rules(LOGICAL_RULES):
        (_, (got_y, stats)), grads = step(params, x)
    logits = np.asarray(x, np.float64) @ np.asarray(params["router"], np.float64)
    top2 = np.argsort(-logits, axis=-1)[..., :2]
    per_expert = np.bincount(top2.ravel(), minlength=8)
    pairs_per_device = x.shape[0] // 8 * x.shape[1] * 2
    expected = np.sum(np.maximum(per_expert - pairs_per_device, 0))
    assert expected > 0 and float(stats["dropped"]) == expected, (stats["dropped"], expected)
    rows = x.shape[0] // 8  # device 0's rows
    np.testing.assert_allclose(got_y[:rows], want_y[:rows], rtol=2e-5, atol=2e-5)
    assert not np.allclose(got_y, want_y, atol=1e-3)  # others lost pairs
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.slow
def test_expert_parallel_layer_matches_1_device_on_8_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    from conftest import unoptimized_env

    env |= unoptimized_env()  # compiling is the cost
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_ragged_all_to_all_path_compiles_for_tpu():
    """The TPU path itself (ragged_all_to_all, forward and backward) on v5e:2x2, expert 2 x
    fsdp 2: XLA:CPU cannot run it, the TPU compiler must accept it."""
    import jax
    import numpy as np
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec

    from flaxlm.parallel.sharding import LOGICAL_RULES
    from flaxlm.tools import targets

    if not targets.libtpu_installed():
        pytest.skip("needs libtpu: pip install -e '.[tpu]'")
    mesh = _mesh(targets.tpu_devices("v5e:2x2"), {"fsdp": 2, "expert": 2})
    step, init = _layer_and_grads(0.0)
    x_shape = jax.ShapeDtypeStruct((8, 128, 16), np.float32)
    params = jax.eval_shape(init, x_shape)
    replicated = NamedSharding(mesh, PartitionSpec())
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        (params, x_shape))  # fmt: skip
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        lowered = step.lower(*args)
    compiled = lowered.compile()
    assert "ragged-all-to-all" in compiled.as_text()  # the exchange, forward and backward


if __name__ == "__main__":
    _worker()
