"""The peak MFU divides by (flaxlm/runtime/peaks.py): the published table looked up through the
abstract devices `flaxlm plan --target` creates, the unknown-chip path, the CPU probe's
estimator and its cache."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
from conftest import REPO

from flaxlm.runtime import peaks
from flaxlm.runtime.peaks import Peak, best_round_rate, cpu_peak, published_peak, run_peak

# Per-chip dense peaks as the vendors publish them (TFLOP/s; int8: TOP/s), typed in again here
# from the datasheets rather than read from the table under test.
TPU_BF16 = {"v4:2x2x1": 275, "v5e:2x2": 197, "v5p:2x2x1": 459, "v6e:2x2": 918}
TPU_INT8 = {"v4:2x2x1": 275, "v5e:2x2": 394, "v5p:2x2x1": 918, "v6e:2x2": 1836}
GPU_PEAKS = {  # bf16, fp8 (None: the chip has none), int8
    "h100:8": (989.5, 1979, 1979),
    "a100:8": (312, None, 624),
    "b200:8": (2250, 4500, 4500),
}


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(peaks, "_warned", set())


def test_published_peaks_of_the_tpu_topologies_plan_compiles_for():
    from flaxlm.tools.targets import libtpu_installed, tpu_devices

    if not libtpu_installed():
        pytest.skip("libtpu not installed: pip install -e '.[tpu]'")
    for topology, tflops in TPU_BF16.items():
        devices = tpu_devices(topology)
        peak = run_peak(devices, "bfloat16")
        kind = devices[0].device_kind
        assert peak.flops == tflops * 1e12, topology
        assert peak.origin == f"published:{kind}:bf16"
        assert peak.devices == 4, topology  # 4 chips (v4's 2x2x1: 8 devices, 2 per chip)
        assert published_peak(kind, "int8").flops == TPU_INT8[topology] * 1e12
        assert published_peak(kind, "float32") is None  # no published fp32 MXU peak


def test_published_peaks_of_the_gpu_targets_plan_compiles_for():
    from flaxlm.tools import gpu_targets

    if not gpu_targets.cuda_plugin_installed():
        pytest.skip("jax's CUDA plugin not installed: pip install -e '.[cuda12]'")
    for target, (bf16, fp8, int8) in GPU_PEAKS.items():
        devices = gpu_targets.gpu_devices(target)
        kind = devices[0].device_kind
        peak = run_peak(devices, "bfloat16")
        assert (peak.flops, peak.devices) == (bf16 * 1e12, 8), target
        assert peak.origin == f"published:{kind}:bf16"
        assert published_peak(kind, "float16").flops == bf16 * 1e12
        assert published_peak(kind, "int8").flops == int8 * 1e12
        fp8_peak = published_peak(kind, "float8_e4m3fn")
        assert (fp8_peak and fp8_peak.flops) == (fp8 and fp8 * 1e12)


def test_an_unknown_device_kind_gives_no_mfu_and_one_warning():
    from flaxlm.train.throughput import Throughput

    chip = SimpleNamespace(platform="tpu", device_kind="TPU v99 imaginary", core_on_chip=0)
    with pytest.warns(UserWarning, match="TPU v99 imaginary") as caught:
        assert run_peak([chip] * 4, "bfloat16") is None
        assert run_peak([chip] * 4, "bfloat16") is None  # again: no second warning
    assert len(caught) == 1
    meter = Throughput(tokens_per_step=10, flops_per_step=1e6, peak_flops=float("nan"))
    meter.step_done(1)
    meter.step_done(2)
    assert "mfu" not in meter.rate()


def test_a_known_chip_without_that_dtype_is_unknown_too():
    """float32 on a v5e: the chip publishes no such figure, so no MFU (not the bf16 one)."""
    chip = SimpleNamespace(platform="tpu", device_kind="TPU v5 lite", core_on_chip=0)
    with pytest.warns(UserWarning, match="fp32"):
        assert run_peak([chip], "float32") is None


def test_plan_mfu_fields_against_the_published_peak():
    from flaxlm.config import load_config
    from flaxlm.train.flops import flops_per_token, plan_mfu_fields

    cfg = load_config(REPO / "configs/gpt_tiny.yaml", ["model.dtype=bfloat16"], check_paths=False)
    step_flops = flops_per_token(cfg.model, cfg.data.seq_len) * (
        cfg.train.batch_size * cfg.data.seq_len
    )
    v4 = {"device_kind": "TPU v4", "devices": 8, "devices_per_chip": 2}  # a plan's report
    npu = {"device_kind": "Some NPU", "devices": 8}
    fields = plan_mfu_fields(cfg, v4, step_times=(0.5,))  # 4 chips
    assert fields["model_flops_per_step"] == step_flops
    assert fields["peak_flops_per_device"] == 275e12 and fields["chips"] == 4
    assert fields["peak_origin"] == "published:TPU v4:bf16"
    assert fields["mfu_at_step_s"]["0.5"] == pytest.approx(step_flops / 0.5 / (4 * 275e12))
    assert fields["step_s_at_full_peak"] == pytest.approx(step_flops / (4 * 275e12))
    unknown = plan_mfu_fields(cfg, npu, step_times=(0.5,))
    assert unknown["peak_origin"] is None and unknown["mfu_at_step_s"] == {"0.5": None}
    assert unknown["peak_unknown"] == "no published bf16 peak for Some NPU: no MFU"


class LoadedMachine:
    """A simulated shared machine: a matmul takes 10 ms (plus up to 2 % jitter), and other
    work comes in bursts (about 0.2 s long, 30 % of the time) that slow it 1.5-3x; ``run_calls``
    advances its clock."""

    def __init__(self, seed: int):
        self.rng, self.now, self.busy = random.Random(seed), 0.0, False

    def clock(self) -> float:
        return self.now

    def run_calls(self, calls: int) -> None:
        for _ in range(calls):
            if self.rng.random() < (0.05 if self.busy else 0.02):
                self.busy = not self.busy
            slow = self.rng.uniform(1.5, 3.0) if self.busy else 1.0
            self.now += 0.010 * self.rng.uniform(1.0, 1.02) * slow


def test_probe_estimator_holds_still_where_single_timings_do_not():
    """Repeated probes on the loaded machine agree within 5 % (the issue's bar), while single
    matmul timings on it spread by over 50 %: the estimator, not luck, holds still."""
    probes, singles = [], []
    for seed in range(8):
        machine = LoadedMachine(seed)
        probes.append(best_round_rate(machine.run_calls, 1e9, 8, 0.25, clock=machine.clock))
        t0 = machine.now
        machine.run_calls(1)
        singles.append(1e9 / (machine.now - t0))
    assert max(probes) / min(probes) < 1.05
    assert max(singles) / min(singles) > 1.5
    assert max(probes) <= 1e9 / 0.010 + 1e-3  # never above the machine's real speed


def test_real_cpu_probe_repeats():
    """Three short real probes of this machine agree, loosely: the suite shares the CPU with
    other work (under a load of ~10 on 2 cores, full probes spread 40-60 %: docs/benchmarks.md);
    the 5 % bar is the estimator's, checked above on the simulated machine."""
    values = [peaks.measure_cpu_peak("float32", n=512, rounds=4, round_s=0.05) for _ in range(3)]
    assert min(values) > 0
    assert max(values) / min(values) < 3.0


def test_cpu_peak_is_cached_per_machine_and_dtype(tmp_path):
    calls = []

    def measure(dtype):
        calls.append(dtype)
        return {"float32": 100e9, "bfloat16": 250e9}[dtype]

    path = tmp_path / "cache" / "peaks.json"
    first = cpu_peak("float32", path, measure)
    assert first == Peak(100e9, "measured:cpu:fp32") and calls == ["float32"]
    assert cpu_peak("float32", path, measure) == first and calls == ["float32"]  # cached
    assert cpu_peak("bfloat16", path, measure).flops == 250e9  # another dtype: measured
    assert calls == ["float32", "bfloat16"]
    data = json.loads(path.read_text())
    assert sorted(data) == sorted([peaks.machine_key("float32"), peaks.machine_key("bfloat16")])
    assert all(key.split("|")[3] in ("fp32", "bf16") for key in data)
    assert [p.name for p in path.parent.iterdir()] == ["peaks.json"]  # no temp file left
    path.write_text("{not json")  # a damaged cache is measured again and rewritten
    assert cpu_peak("float32", path, measure).flops == 100e9 and len(calls) == 3
    assert json.loads(path.read_text())[peaks.machine_key("float32")]["flops"] == 100e9


def test_a_faster_probe_raises_a_peak_cached_on_a_busy_machine(tmp_path):
    path = tmp_path / "peaks.json"
    cpu_peak("float32", path, lambda dtype: 35e9)  # probed while the machine was loaded
    assert not peaks.raise_cpu_peak("float32", 30e9, path)  # a slower probe changes nothing
    assert cpu_peak("float32", path, lambda dtype: 0.0).flops == 35e9
    assert peaks.raise_cpu_peak("float32", 110e9, path)  # a quieter machine's probe heals it
    assert cpu_peak("float32", path, lambda dtype: 0.0).flops == 110e9
    assert cpu_peak("bfloat16", path, lambda dtype: 250e9).flops == 250e9  # per dtype


def test_cpu_devices_count_the_machine_once(tmp_path):
    cpus = [SimpleNamespace(platform="cpu", device_kind="cpu")] * 8
    path = tmp_path / "peaks.json"
    cpu_peak("float32", path, lambda dtype: 50e9)
    assert run_peak(cpus, "float32", path) == Peak(50e9, "measured:cpu:fp32", 1)
