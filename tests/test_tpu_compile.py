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

pytestmark = [
    pytest.mark.skipif(
        not targets.libtpu_installed(), reason="needs libtpu: pip install -e '.[tpu]'"
    ),
    # Nothing runs, so XLA's backend optimizations only slow the compiles (conftest.py).
    pytest.mark.usefixtures("unoptimized_compiles"),
]

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
        "context": 1,
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
    assert build_mesh(cfg.mesh, devices).shape == {
        "data": 2, "fsdp": 1, "expert": 1, "context": 1, "tensor": 2,
    }  # fmt: skip
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
            "mesh (data=1, fsdp=2, expert=1, context=1, tensor=3) has 6",
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


# Activations dominate this shape (4 layers of 256 x 1024 SwiGLU over 2,048 tokens a device).
REMAT_SHAPE = (
    "data.seq_len=256", "model.max_seq_len=256", "model.d_model=256", "model.n_heads=4",
    "model.n_kv_heads=2", "model.d_ff=1024", "model.n_layers=4", "model.scan_layers=true",
    "model.dtype=bfloat16", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1", "train.batch_size=32",
)  # fmt: skip


@pytest.mark.slow
def test_remat_policies_trade_device_memory_for_recomputation():
    """none keeps every activation; save_all_proj the projections' outputs (more than full,
    which keeps only the blocks' inputs); offload_all_proj moves those to host memory."""
    reports = {
        remat: plan(load_config(REPO / "configs/llama_tiny.yaml",
                                [*REMAT_SHAPE, f"model.remat={remat}"], False), "v5e:2x2")
        for remat in ("none", "full", "save_all_proj", "offload_all_proj")
    }  # fmt: skip
    temps = {remat: r["activations_bytes"] for remat, r in reports.items()}
    assert temps["full"] < temps["save_all_proj"] < temps["none"], temps
    # The kept projections: per layer, q/k/v/attention (bf16, 768 wide), up/gate (bf16, the
    # compute dtype, 1024 wide each), the hidden activation (bf16, 1024 wide) and the
    # attention-output and down projections (bf16, d_model 256 each), for 2,048 tokens.
    kept = 4 * 2048 * (768 * 2 + 2 * 1024 * 2 + 1024 * 2 + 2 * 256 * 2)
    assert reports["save_all_proj"]["host_temp_bytes"] == 0
    assert kept <= reports["offload_all_proj"]["host_temp_bytes"] < 1.1 * kept, reports
    assert temps["offload_all_proj"] < temps["save_all_proj"] + kept / 2


def test_a_program_that_does_not_fit_reports_the_bytes_the_compiler_asked_for():
    """65,536 sequences of 128 tokens on a 16 GiB v5e: the compiler stops in seconds with
    RESOURCE_EXHAUSTED; plan reports fits false and the temporaries it asked for."""
    code, out, err = cli("plan", REPO / "configs/gpt_tiny.yaml", *TPU_TINY, "mesh.tensor=1",
                         "mesh.fsdp=1", "mesh.data=4", "train.batch_size=65536",
                         "--target", "v5e:2x2", "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["fits"] is False and report["compiler"] == "tpu"
    assert "RESOURCE_EXHAUSTED" in report["compiler_message"]
    asked = report["activations_bytes"]
    assert asked > report["hbm_bytes"] > 10 * 2**30, report
    # 16,384 rows x 128 positions x 384 vocab of float32 logits a device, at the least.
    assert asked > 16384 * 128 * 384 * 4
    batch = 16384 * 128 * 4 * 4  # int32 tokens, targets, positions, segments a device
    assert report["batch_bytes"] >= batch
    assert report["bytes_per_device"] == report["arguments_bytes"] + asked
    assert "does NOT fit" in format_plan(report) and "RESOURCE_EXHAUSTED" in format_plan(report)


def test_remat_comparison_plans_once_per_policy():
    argv = ("plan", REPO / "configs/gpt_tiny.yaml", *TPU_TINY, "--target", "v5e:2x2")
    code, out, err = cli(*argv, "--remat", "full,none", "--json")
    assert code == 0, err
    reports = json.loads(out)
    assert list(reports) == ["full", "none"]
    assert all(r["fits"] and r["bytes_per_device"] > 0 for r in reports.values())
    code, out, _ = cli(*argv, "--remat", "full,save_qkv_proj")
    assert code == 0 and out.splitlines()[0].startswith("remat")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["full", "save_qkv_proj"]
