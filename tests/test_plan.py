"""``flaxlm plan``: per-device memory from an ahead-of-time compile on simulated devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

GIB = 1024**3


def _plan(devices: int, config: str, *overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "flaxlm.cli", "plan", "--devices", str(devices), "--json"]
    proc = subprocess.run(
        [*cmd, str(REPO / config), *overrides], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_7b_fits_in_16_gib_per_device_on_64_devices_with_fsdp():
    report = _plan(64, "configs/gpt_7b.yaml")
    assert report["devices"] == 64 and report["mesh"]["fsdp"] == 64
    assert 6e9 < report["n_params"] < 8e9
    assert report["bytes_per_device"] <= 16 * GIB, report
    parts = report["params_bytes"] + report["opt_state_bytes"] + report["activations_bytes"]
    assert parts <= report["bytes_per_device"]
    assert report["compile_s"] > 0


def test_fsdp_divides_parameter_and_optimizer_bytes():
    shape = ("model.n_layers=2", "train.batch_size=8")
    one = _plan(1, "configs/gpt_demo.yaml", *shape)
    eight = _plan(8, "configs/gpt_demo.yaml", *shape, "mesh.data=1", "mesh.fsdp=8")
    for key in ("params_bytes", "opt_state_bytes"):
        # Only biases and norm scales stay whole on every device: the 5 % slack.
        assert eight[key] <= one[key] / 8 * 1.05, (key, one[key], eight[key])
    assert one["params_bytes"] > 4 * 2**20  # a real model, not rounding noise


def test_gpu_targets_parse_and_describe_the_published_figures():
    """GPU targets (flaxlm/tools/gpu_targets.py) without the CUDA plugin: names, hosts and
    the compiler's description; compiling for them is tests/test_gpu_compile.py."""
    import pytest

    from flaxlm.config import ConfigError
    from flaxlm.tools import gpu_targets

    assert isinstance(gpu_targets.cuda_plugin_installed(), bool)  # never raises
    assert gpu_targets.parse_gpu_target("h100:8") == ("h100", 1, 8)
    assert gpu_targets.parse_gpu_target("H100:2x8") == ("h100", 2, 8)
    assert gpu_targets.is_gpu_target("b200:8") and not gpu_targets.is_gpu_target("v5e:2x2")
    for bad in ("h100", "h100:x8", "v100:8", "h100:2x"):
        with pytest.raises(ConfigError, match="is not a GPU target: MODEL:GPUS or"):
            gpu_targets.parse_gpu_target(bad)
    h100 = gpu_targets.GPUS["h100"]
    assert (h100.sms, h100.compute_capability, h100.memory_bytes) == (132, (9, 0), 80 * GIB)
    text = gpu_targets.target_config_text(h100)
    assert "core_count: 132" in text and "cuda_compute_capability { major: 9 minor: 0 }" in text
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
    assert gpu_targets.GPUS["a100"].compute_capability == (8, 0)
    assert gpu_targets.GPUS["b200"].memory_bytes == 180 * GIB
    hlo = (
        'custom_call_target="__cudnn$fmhaSoftmax" custom_call_target="__cudnn$fmhaSoftmaxBackward" '
        'custom_call_target="__gpu$xla.gpu.triton" custom_call_target="__cublas$gemm"'
    )
    assert gpu_targets.kernel_counts(hlo) == {
        "cudnn_kernels": 2,
        "cudnn_attention_kernels": 2,
        "triton_kernels": 1,
        "xla_triton_fusions": 0,
    }


def test_the_bytes_a_resource_exhausted_message_asks_for():
    """The TPU compiler's figure is GiB ("15.75G" is v5e's 16 GiB less the reserve); a
    message without one gives None, and only RESOURCE_EXHAUSTED counts as out of memory."""
    from flaxlm.tools import compile_oom

    tpu = RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (44.26G) exceeds available HBM (15.75G).\n=== Source Location Trace ==="
    )
    assert compile_oom.is_out_of_memory(tpu)
    assert compile_oom.asked_bytes(str(tpu)) == round(44.26 * GIB)
    assert compile_oom.first_line(tpu).endswith("exceeds available HBM (15.75G).")
    assert compile_oom.asked_bytes("RESOURCE_EXHAUSTED: failed to allocate 123456 bytes") == 123456
    assert compile_oom.asked_bytes("RESOURCE_EXHAUSTED: something else") is None
    assert not compile_oom.is_out_of_memory(RuntimeError("INVALID_ARGUMENT: bad shape"))
