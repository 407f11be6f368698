#!/usr/bin/env bash
# GPU readiness, on a machine with an NVIDIA GPU (CUDA 12 driver), from the repository root:
#
#   bash benchmarks/gpu_check.sh            # VENV=.venv-gpu PYTHON=python3.11 by default
#
# 1. creates (or reuses) a venv and installs flaxlm with the cuda12 and dev extras;
# 2. checks that jax sees the GPU;
# 3. runs the tests marked `gpu` (tests/test_gpu.py: cuDNN flash attention against the
#    reference attention, forward and gradients; bf16 against fp32 train steps;
#    tests/test_gpu_attention.py: the Pallas GPU flash kernel with segment ids compiled by
#    Triton, against the reference, forward and gradients);
# 4. runs `flaxlm bench` in bf16 on GPT-2 small (124M, seq 1024) on one GPU and prints its MFU
#    against the chip's bf16 dense peak (benchmarks/gpu_mfu.py; GPU_PEAK_TFLOPS for a chip
#    not in its table), with `attention_impl` auto (the Triton flash kernel) and cudnn;
# 5. compares the deviceless plan (`flaxlm plan --target h100:1`, what this repository
#    compiles without a GPU) with the same step's memory on the real GPU: the compiler's
#    memory analysis of the local compile (gpu_check/plan_*.json).
#
# Writes gpu_check/bench*.json, gpu_check/plan_*.json and gpu_check/pytest.log; exits non-zero
# at the first failure. Not yet run on a GPU: record what it prints in benchmarks/RESULTS.md
# when it has been.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv-gpu}
OUT=${OUT:-gpu_check}
BENCH_CONFIG=${BENCH_CONFIG:-configs/gpt_small.yaml}
BENCH_BATCH=${BENCH_BATCH:-16}

if ! nvidia-smi -L; then
  echo "gpu_check: nvidia-smi found no NVIDIA GPU (or no driver)" >&2
  exit 1
fi
mkdir -p "$OUT"

echo "== install: .[cuda12,dev] into $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -e '.[cuda12,dev]'

echo "== jax devices"
"$VENV/bin/python" - <<'PY'
import jax
devices = jax.devices()
print(jax.__version__, devices)
assert devices[0].platform == "gpu", f"jax runs on {devices[0].platform}, not the GPU"
PY

echo "== tests marked gpu"
"$VENV/bin/python" -m pytest -m gpu -n 0 -rs tests/test_gpu.py tests/test_gpu_attention.py \
  2>&1 | tee "$OUT/pytest.log"

echo "== flaxlm bench, bf16, $BENCH_CONFIG, batch $BENCH_BATCH, one GPU"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} "$VENV/bin/flaxlm" bench "$BENCH_CONFIG" \
  model.dtype=bfloat16 "train.batch_size=$BENCH_BATCH" --steps 20 --warmup 5 --json \
  | tee "$OUT/bench.json"
"$VENV/bin/python" benchmarks/gpu_mfu.py "$OUT/bench.json"

echo "== the same with attention_impl=cudnn"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} "$VENV/bin/flaxlm" bench "$BENCH_CONFIG" \
  model.dtype=bfloat16 model.attention_impl=cudnn "train.batch_size=$BENCH_BATCH" --steps 20 \
  --warmup 5 --json | tee "$OUT/bench_cudnn.json"
"$VENV/bin/python" benchmarks/gpu_mfu.py "$OUT/bench_cudnn.json"

echo "== plan without a GPU (described H100) against the plan on this GPU"
PLAN_ARGS=("$BENCH_CONFIG" model.dtype=bfloat16 "train.batch_size=$BENCH_BATCH" mesh.data=1
  mesh.fsdp=1 mesh.tensor=1 --json)
JAX_PLATFORMS=cpu "$VENV/bin/flaxlm" plan "${PLAN_ARGS[@]}" --target h100:1 \
  | tee "$OUT/plan_described.json"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} "$VENV/bin/flaxlm" plan "${PLAN_ARGS[@]}" \
  | tee "$OUT/plan_local.json"
