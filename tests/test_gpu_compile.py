"""The train and decode steps compile for NVIDIA GPUs with the real XLA GPU compiler (jax's
CUDA plugin) on this machine without a GPU: described H100s (flaxlm/tools/gpu_targets.py),
their sharding, memory, cuDNN and Triton kernels are the GPU compiler's own; nothing runs.
Skipped where the CUDA plugin is not installed (``pip install -e '.[cuda12]'``; ``make test``
installs it). Kernel counts come from the compiled program's HLO text: a program that should
run the Pallas GPU flash kernel (``triton_kernels``) or cuDNN's fused attention
(``cudnn_attention_kernels``) fails here when the kernel disappears from it.
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
from flaxlm.tools import gpu_targets
from flaxlm.tools.generate import GenerateOptions, _sample_generate
from flaxlm.tools.plan import format_plan, plan
from flaxlm.train.state import abstract_state, param_shardings

pytestmark = pytest.mark.skipif(
    not gpu_targets.cuda_plugin_installed(),
    reason="needs jax's CUDA plugin (the XLA GPU compiler): pip install -e '.[cuda12]'",
)

# Tiny: one layer, 32 positions (one flash tile), head dim 16; all three mesh axes used.
GPU_TINY = (
    "model.n_layers=1",
    "model.attention_impl=auto",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=2",
)
FAMILIES = ("gpt_tiny", "bert_tiny", "unified_tiny", "llama_tiny", "mixtral_tiny")
REQUIRED_FIELDS = (
    "compiler", "device_kind", "devices", "bytes_per_device", "hbm_bytes", "fits", "compile_s",
    "cudnn_kernels", "cudnn_attention_kernels", "triton_kernels", "xla_triton_gemm",
    "params_bytes", "opt_state_bytes", "activations_bytes",
)  # fmt: skip


def _config(name: str, *overrides: str):
    return load_config(REPO / "configs" / f"{name}.yaml", [*GPU_TINY, *overrides], False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_train_step_compiles_for_8_h100s_with_the_flash_kernel(name, dtype):
    report = plan(_config(name, f"model.dtype={dtype}"), "h100:8")
    assert report["compiler"] == "gpu" and report["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert report["devices"] == 8 and report["hosts"] == 1
    assert report["attention_impl"] == "triton"
    # Forward and backward Pallas kernels (the prefix LM of unified_tiny: two of each).
    assert report["triton_kernels"] >= 2, report
    assert report["cudnn_attention_kernels"] == 0  # packed rows never reach cuDNN as a mask
    assert report["hbm_bytes"] == 80 * 2**30 and report["fits"] is True
    parts = report["params_bytes"] + report["opt_state_bytes"] + report["activations_bytes"]
    assert parts <= report["bytes_per_device"] < 64 * 2**20


def test_plan_cli_prints_the_gpu_report():
    code, out, err = cli("plan", REPO / "configs/gpt_tiny.yaml", *GPU_TINY, "--target", "h100:8",
                         "--json")  # fmt: skip
    assert code == 0, err
    assert err == ""  # the CUDA plugin loads as a compiler: no warnings about the missing GPU
    report = json.loads(out)
    assert set(REQUIRED_FIELDS) <= set(report), set(REQUIRED_FIELDS) - set(report)
    assert report["compiler"] == "gpu" and report["triton_kernels"] > 0
    text = format_plan(report)
    assert "GPU h100:8 (1 x 8 NVIDIA H100 80GB HBM3), attention triton" in text
    assert "per device: fits" in text


@pytest.mark.parametrize(
    "overrides, impl, kernel",
    [
        (("model.dtype=bfloat16", "model.attention_impl=cudnn"), "cudnn", "cudnn"),
        # 24 positions: no flash tile divides it; cuDNN takes bf16 ...
        (("model.dtype=bfloat16", "data.seq_len=24"), "triton", "cudnn"),
        # ... but not fp32 (cuDNN: "Unsupported dtype"): XLA's own attention then
        (("model.dtype=float32", "data.seq_len=24"), "triton", None),
    ],
    ids=["cudnn_bf16", "auto_untiled_bf16", "auto_untiled_fp32"],
)
def test_cudnn_where_it_takes_the_case(overrides, impl, kernel):
    report = plan(_config("gpt_tiny", *overrides), "h100:8")
    assert report["attention_impl"] == impl
    assert report["triton_kernels"] == 0
    assert (report["cudnn_attention_kernels"] > 0) == (kernel == "cudnn"), report


def test_two_hosts_put_the_data_axis_across_hosts():
    sixteen = ("mesh.data=4", "mesh.fsdp=4", "mesh.tensor=1", "train.batch_size=16")
    devices = gpu_targets.gpu_devices("h100:2x8")
    assert len(devices) == 16 and sorted({d.process_index for d in devices}) == [0, 1]
    mesh = build_mesh(_config("gpt_tiny", *sixteen, "mesh.dcn_data=2").mesh, devices)
    for i in range(4):  # data = 2 hosts x 2 within a host; fsdp stays within the host
        assert {d.process_index for d in mesh.devices[i].flat} == {i // 2}
    report = plan(_config("gpt_tiny", *sixteen), "h100:2x8")  # no DCN factor: hosts on data
    assert report["devices"] == 16 and report["hosts"] == 2 and report["gpus_per_host"] == 8
    assert report["mesh"]["data"] == 4 and report["fits"] and report["triton_kernels"] > 0
    assert report["dcn"] == {"data": 2, "fsdp": 1}
    assert "(2 x 8 NVIDIA H100 80GB HBM3; the hosts split data)" in format_plan(report)
    with pytest.raises(ConfigError, match=r"devices are in 2 slice\(s\) but mesh.dcn_data x"):
        build_mesh(_config("gpt_tiny", *sixteen, "mesh.dcn_data=4").mesh, devices)


@pytest.mark.parametrize("target", ["a100:8", "b200:8"])
def test_other_gpus_compile(target):
    report = plan(_config("gpt_tiny", "model.dtype=bfloat16"), target)
    assert report["device_kind"] == gpu_targets.gpu_spec(target).description
    assert report["triton_kernels"] > 0 and report["fits"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--target", "h100:0"), "hosts and GPUs per host must be >= 1"),
        (("--target", "h100:8", "--slices", "2"), "a GPU target names its hosts"),
        (("--target", "h100:8", "mesh.tensor=3"), "mesh (data=2, fsdp=2, expert=1, context=1"),
    ],
)
def test_errors_are_one_line(argv, message):
    overrides = [a for a in argv if "=" in a]
    options = [a for a in argv if "=" not in a]
    code, out, err = cli("plan", REPO / "configs/gpt_tiny.yaml", *GPU_TINY, *overrides, *options)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_without_the_cuda_plugin_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gpu_targets, "cuda_plugin_installed", lambda: False)
    code, _, err = cli("plan", REPO / "configs/gpt_tiny.yaml", "--target", "h100:8")
    assert code == 2 and err.count("\n") == 1
    assert "needs jax's CUDA plugin: pip install -e '.[cuda12]'" in err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_decode_compiles_for_8_h100s(dtype):
    cfg = _config("gpt_tiny", f"model.dtype={dtype}")
    model = build_model(cfg.model)
    mesh = build_mesh(cfg.mesh, gpu_targets.gpu_devices("h100:8"))
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state(model, _optax_sgd(), cfg.data.seq_len).params,
        param_shardings(model, mesh, cfg.data.seq_len),
    )
    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    prompt_BxP = jax.ShapeDtypeStruct((4, 16), jnp.int32, sharding=rows)
    lengths_B = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=rows)
    seed = jax.ShapeDtypeStruct((), jnp.uint32)
    opts = GenerateOptions(max_new_tokens=8, temperature=0.8, top_k=20)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        lowered = _sample_generate.lower(
            model, params, prompt_BxP, prompt_BxP, prompt_BxP, lengths_B, seed,
            opts=opts, eos_id=2, pad_id=0, context=cfg.data.seq_len, cached=8,
        )  # fmt: skip
        compiled, _ = gpu_targets.compile_for_gpus(lowered)
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert jax.tree.leaves(compiled.out_info)[0].shape == (4, 8)
    assert gpu_targets.kernel_counts(compiled.as_text())["triton_kernels"] == 0  # dense decode


def _optax_sgd():
    import optax

    return optax.sgd(0.1)
