"""How build_mesh lays devices out: the DCN (slice) factor is the outer part of the data /
fsdp axis, on devices that name their slice and on simulated ones that do not. Fake devices
stand in for real ones here; tests/test_tpu_compile.py does the same on TPU topologies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from flaxlm.config import ConfigError, MeshConfig, load_config
from flaxlm.parallel.sharding import device_grid, resolve_mesh_shape


@dataclass(frozen=True)
class FakeDevice:
    id: int
    slice_index: int | None = None
    platform: str = "cpu"


def _slices(grid: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda d: d.slice_index)(grid)


def test_one_slice_keeps_the_cpu_device_order():
    devices = [FakeDevice(i) for i in range(8)]
    grid = device_grid((2, 2, 2), (1, 1, 1), devices)
    assert [d.id for d in grid.flat] == list(range(8))


def test_slices_are_the_outer_factor_of_the_data_axis():
    devices = [FakeDevice(i, slice_index=i // 4) for i in range(8)]
    grid = device_grid((4, 2, 1), (2, 1, 1), devices)  # data = 2 slices x 2 in a slice
    assert _slices(grid)[:, :, 0].tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
    # Within a slice, the devices keep their order.
    assert [d.id for d in grid[2:].flat] == [4, 5, 6, 7]


def test_slices_along_fsdp_and_along_both_axes():
    devices = [FakeDevice(i, slice_index=i // 2) for i in range(8)]
    grid = device_grid((1, 8, 1), (1, 4, 1), devices)
    assert _slices(grid)[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    grid = device_grid((2, 4, 1), (2, 2, 1), devices)
    assert _slices(grid)[:, :, 0].tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]


def test_devices_without_slices_stand_in_by_consecutive_runs():
    devices = [FakeDevice(i) for i in range(8)]  # simulated CPU devices name no slice
    grid = device_grid((4, 2, 1), (2, 1, 1), devices)
    assert [d.id for d in grid[:2].flat] == [0, 1, 2, 3]
    assert [d.id for d in grid[2:].flat] == [4, 5, 6, 7]


def test_a_slice_count_the_devices_do_not_have_is_one_line():
    devices = [FakeDevice(i, slice_index=i // 4) for i in range(8)]
    with pytest.raises(ConfigError, match=r"^the 8 devices are in 2 slice\(s\) but .* = 4"):
        device_grid((4, 2, 1), (4, 1, 1), devices)


def test_the_dcn_factor_must_divide_its_axis():
    cfg = MeshConfig(data=-1, fsdp=2, dcn_data=4)
    assert resolve_mesh_shape(cfg, 16) == (8, 2, 1, 1, 1)
    with pytest.raises(ConfigError, match=r"^mesh.dcn_data=4 must divide the data axis, of "):
        resolve_mesh_shape(cfg, 12)


@pytest.mark.parametrize(
    "override, message",
    [
        ("mesh.dcn_data=0", "mesh.dcn_data=0 must be >= 1 (slices along mesh.data)"),
        ("mesh.dcn_fsdp=3", "mesh.dcn_fsdp=3 must divide mesh.fsdp=1"),
    ],
)
def test_bad_dcn_keys_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_parameter_the_mesh_cannot_split_is_named_before_compiling():
    import jax
    from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

    from flaxlm.parallel.sharding import check_divisible

    mesh = AbstractMesh((1, 1, 1, 3), ("data", "fsdp", "expert", "tensor"))
    shapes = {"attn": {"kernel": jax.ShapeDtypeStruct((64, 6, 16), "float32")},
              "mlp": {"bias": jax.ShapeDtypeStruct((4, 16), "float32")}}  # fmt: skip
    shardings = {
        "attn": {"kernel": NamedSharding(mesh, PartitionSpec(None, "tensor", None))},
        "mlp": {"bias": NamedSharding(mesh, PartitionSpec(("fsdp", "tensor"), None))},
    }
    with pytest.raises(
        ConfigError,
        match=r"parameter mlp/bias \(4, 16\): dim 0 \(4\) cannot be split over "
        r"mesh.fsdp=1 x mesh.tensor=3",
    ):
        check_divisible(shapes, shardings)
    check_divisible({"attn": shapes["attn"]}, {"attn": shardings["attn"]})  # 6 heads / 3: fine
