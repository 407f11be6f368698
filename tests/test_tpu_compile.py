"""The train and decode steps compile for real TPU topologies, with the TPU compiler (libtpu)
on this CPU-only machine: sharding, memory and kernel lowering are the TPU's own; nothing runs.
Skipped where libtpu is not installed (``pip install -e '.[tpu]'``; ``make test`` installs it).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec
from test_commands import cli

from flaxlm.config import ConfigError, load_config
from flaxlm.families import build_model
from flaxlm.parallel.sharding import BATCH_AXES, LOGICAL_RULES, build_mesh
from flaxlm.tools import targets
from flaxlm.tools.generate import GenerateOptions, _sample_generate
from flaxlm.tools.plan import format_plan, plan
from flaxlm.train.state import abstract_state, param_shardings

pytestmark = pytest.mark.skipif(
    not targets.libtpu_installed(), reason="needs libtpu: pip install -e '.[tpu]'"
)

# The attention the steps compile with: "auto" picks the Pallas splash kernel on TPU.
ATTENTION = "auto"
# Tiny, in shapes a TPU kernel tiles: 128 positions, head dim 64; all three mesh axes used.
TPU_TINY = (
    "data.seq_len=128",
    "model.max_seq_len=128",
    "model.d_model=128",
    "model.n_heads=2",
    "model.n_layers=1",
    f"model.attention_impl={ATTENTION}",
    "mesh.data=1",
    "mesh.fsdp=2",
    "mesh.tensor=2",
)
REQUIRED_FIELDS = (
    "compiler", "device_kind", "devices", "bytes_per_device", "hbm_bytes", "fits", "compile_s",
    "step_time_estimate_s", "estimate_leaves_out",
    "params_bytes", "opt_state_bytes", "activations_bytes",
)  # fmt: skip


def _config(name: str, *overrides: str):
    return load_config(REPO / "configs" / f"{name}.yaml", [*TPU_TINY, *overrides], False)


@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny", "unified_tiny"])
def test_train_step_compiles_for_v5e_2x2(name):
    code, out, err = cli("plan", REPO / f"configs/{name}.yaml", *TPU_TINY, "--target", "v5e:2x2",
                         "--json")  # fmt: skip
    assert code == 0, err
    assert err == ""  # libtpu loads as a compiler: no warnings about the missing TPU
    report = json.loads(out)
    assert set(REQUIRED_FIELDS) <= set(report), set(REQUIRED_FIELDS) - set(report)
    assert report["compiler"] == "tpu" and report["device_kind"] == "TPU v5 lite"
    assert report["devices"] == 4 and report["mesh"] == {
        "data": 1,
        "fsdp": 2,
        "expert": 1,
        "tensor": 2,
    }
    assert report["attention_impl"] == ("splash" if ATTENTION == "auto" else ATTENTION)
    assert report["mosaic_kernels"] > 0  # auto on TPU = splash, a Mosaic kernel
    assert report["hbm_bytes"] == 16 * 2**30 and report["fits"] is True
    assert report["compile_s"] > 0 and report["step_time_estimate_s"] > 0
    assert "custom kernels" in report["estimate_leaves_out"]
    parts = report["params_bytes"] + report["opt_state_bytes"] + report["activations_bytes"]
    assert parts <= report["bytes_per_device"] < 64 * 2**20
    # The state is counted once: its outputs reuse the donated inputs' buffers.
    assert report["aliased_bytes"] >= report["params_bytes"] + report["opt_state_bytes"]
    if name == "gpt_tiny":
        text = format_plan(report)
        assert "TPU v5e:2x2 (TPU v5 lite)" in text and "per device: fits" in text


def test_splash_is_compiled_under_remat_and_scan():
    """nn.remat / nn.scan trace every leaf of the mask: whether it is a decode mask must stay
    static (Mask.decoding), or attention() would quietly fall back to xla."""
    cfg = _config("gpt_tiny", "model.attention_impl=auto", "model.remat=full",
                  "model.scan_layers=true")  # fmt: skip
    assert plan(cfg, "v5e:2x2")["mosaic_kernels"] > 0


def test_mesh_minus_one_fills_the_topology():
    cfg = _config("gpt_tiny", "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=2")
    devices = targets.tpu_devices("v5p:2x2x1")
    assert build_mesh(cfg.mesh, devices).shape == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 2}
    assert targets.chip_hbm_bytes(devices[0].device_kind) == 95 * 2**30  # "TPU v5" = v5p
    v4 = targets.tpu_devices("v4:2x2x1")  # one device per TensorCore: 2 per chip
    assert len(v4) == 8 and targets.devices_per_chip(v4) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--target", "v5e:3x3"), "'v5e:3x3' is not a TPU topology libtpu can compile for (e.g. "),
        (("--target", "bogus"), "'bogus' is not a TPU topology"),
        (("--slices", "2"), "--slices 2 needs --target"),
        (("--target", "v5e:2x2", "--devices", "4"), "give --devices"),
        (
            ("--target", "v5e:2x2", "mesh.tensor=3"),
            "mesh (data=1, fsdp=2, expert=1, tensor=3) has 6",
        ),
    ],
)
def test_errors_are_one_line(argv, message):
    overrides = [a for a in argv if "=" in a]
    options = [a for a in argv if "=" not in a]
    code, out, err = cli("plan", REPO / "configs/gpt_tiny.yaml", *TPU_TINY, *overrides, *options)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_without_libtpu_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(targets, "libtpu_installed", lambda: False)
    code, _, err = cli("plan", REPO / "configs/gpt_tiny.yaml", "--target", "v5e:2x2")
    assert code == 2 and err.count("\n") == 1
    assert "needs libtpu: pip install -e '.[tpu]'" in err


def test_two_slices_put_the_dcn_on_the_outer_data_axis():
    cfg = _config("gpt_tiny", "mesh.data=4", "mesh.fsdp=2", "mesh.tensor=1", "mesh.dcn_data=2")
    devices = targets.tpu_devices("v5e:2x2", slices=2)
    assert sorted({d.slice_index for d in devices}) == [0, 1]
    mesh = build_mesh(cfg.mesh, devices)
    grid = mesh.devices  # (data 4, fsdp 2, tensor 1): data = 2 slices x 2 within a slice
    for i in range(4):
        # The outer factor of data picks the slice; fsdp and the inner data factor stay in it.
        assert {d.slice_index for d in grid[i].flat} == {i // 2}
    report = plan(cfg, "v5e:2x2", slices=2)
    assert report["devices"] == 8 and report["slices"] == 2 and report["fits"]
    with pytest.raises(ConfigError, match=r"devices are in 2 slice\(s\) but mesh.dcn_data x"):
        build_mesh(_config("gpt_tiny", "mesh.data=-1").mesh, devices)


def test_kv_cache_decode_compiles_for_v5e_2x2():
    cfg = _config("gpt_tiny")
    model = build_model(cfg.model)
    mesh = build_mesh(cfg.mesh, targets.tpu_devices("v5e:2x2"))
    params_sh = param_shardings(model, mesh, cfg.data.seq_len)
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state(model, _optax_sgd(), cfg.data.seq_len).params,
        params_sh,
    )
    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    prompt_BxP = jax.ShapeDtypeStruct((4, 32), jnp.int32, sharding=rows)
    lengths_B = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=rows)
    seed = jax.ShapeDtypeStruct((), jnp.uint32)
    opts = GenerateOptions(max_new_tokens=16, temperature=0.8, top_k=20)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        lowered = _sample_generate.lower(
            model, params, prompt_BxP, prompt_BxP, prompt_BxP, lengths_B, seed,
            opts=opts, eos_id=2, pad_id=0, context=cfg.data.seq_len, cached=16,
        )  # fmt: skip
        compiled = lowered.compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert jax.tree.leaves(compiled.out_info)[0].shape == (4, 16)


def _optax_sgd():
    import optax

    return optax.sgd(0.1)
