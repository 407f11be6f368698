"""MFU of a ``flaxlm bench --json`` train report against the GPU's bf16 dense peak.

    flaxlm bench configs/gpt_small.yaml model.dtype=bfloat16 --json | python benchmarks/gpu_mfu.py

``flaxlm bench`` reports MFU against an fp32 matmul it times in the same run (right for a
shared CPU); on a GPU the question is how close the step comes to the chip's datasheet bf16
tensor-core peak (dense, no sparsity). Chips not in :data:`BF16_PEAK_TFLOPS`: set
``GPU_PEAK_TFLOPS``.
"""

from __future__ import annotations

import json
import os
import sys

# Datasheet bf16 dense tensor-core TFLOP/s, matched against jax's device_kind in this order
# (the first name contained in it wins, so the more specific names come first).
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def bf16_peak_tflops(device_kind: str) -> float | None:
    """The peak for ``device_kind`` (``GPU_PEAK_TFLOPS`` overrides; None = unknown)."""
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    for name, tflops in BF16_PEAK_TFLOPS:
        if name in device_kind:
            return tflops
    return None


def mfu_line(report: dict) -> str:
    """One line: the achieved TFLOP/s per device and its share of the bf16 peak."""
    devices = int(report.get("devices", 1))
    achieved = report["tokens_per_s"] * report["flops_per_token_incl_head"] / devices / 1e12
    peak = bf16_peak_tflops(report["device"])
    head = f"{report['device']}: {achieved:.1f} TFLOP/s per device (incl. LM head)"
    if peak is None:
        return f"{head}; bf16 peak unknown for this chip: set GPU_PEAK_TFLOPS to get the MFU"
    return f"{head}, MFU {achieved / peak:.1%} of the {peak:.0f} TFLOP/s bf16 dense peak"


def main() -> int:
    text = open(sys.argv[1]).read() if len(sys.argv) > 1 else sys.stdin.read()
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        print("gpu_mfu: no JSON report in the input", file=sys.stderr)
        return 2
    print(mfu_line(json.loads(lines[-1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
