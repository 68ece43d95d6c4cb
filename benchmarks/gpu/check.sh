#!/usr/bin/env bash
# The prepared GPU check (issue 16): on a machine with one CUDA GPU and ~16 cores, in < 8 min,
#   1. installs what it needs where it can (CuPy from $WHEELS or pip; nothing else is fetched),
#   2. runs the gpu tests (CUDA kernels == CPU fused kernels bit for bit, --device cuda merges),
#   3. merges 4 synthetic 0.84B bf16 checkpoints (task_arithmetic, ties, ties scope model) on
#      the CPU and the GPU, compares the outputs and prints the table (benchmarks/gpu/check.py).
# Usage: benchmarks/gpu/check.sh [check.py options, e.g. --params 0.3B --budget-s 300]
# Env: PYTHON (default: .venv/bin/python, else python3), WHEELS (a folder of wheels to install
#      from without network), SKIP_INSTALL=1.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
echo "== python: $($PYTHON -c 'import sys; print(sys.executable, sys.version.split()[0])')"

have() { $PYTHON -c "import $1" >/dev/null 2>&1; }

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    for need in torch numba safetensors yaml click pytest; do
        have "$need" || echo "MISSING: python package '$need' (install the project: pip install -e '.[dev]')"
    done
    if ! have cupy; then
        if [[ -n "${WHEELS:-}" && -d "${WHEELS}" ]]; then
            echo "== installing cupy-cuda12x from ${WHEELS}"
            $PYTHON -m pip install -q --no-index --find-links "${WHEELS}" cupy-cuda12x \
                || echo "MISSING: cupy-cuda12x (no wheel in ${WHEELS})"
        else
            echo "== trying pip install cupy-cuda12x (60 s at most; the device machine may be offline)"
            timeout 60 $PYTHON -m pip install -q --disable-pip-version-check cupy-cuda12x \
                || echo "MISSING: cupy-cuda12x (offline? set WHEELS=folder-of-wheels); the CuPy test is skipped"
        fi
    fi
fi
# numba compiles the CUDA kernels with libNVVM from a CUDA toolkit (the torch wheels do not ship
# it): CUDA_HOME, else /usr/local/cuda*, else pip's nvidia-cuda-nvcc-cu12.
find_nvvm() {
    local c
    for c in /usr/local/cuda /usr/local/cuda-* \
        "$($PYTHON -c 'import nvidia.cuda_nvcc as m; print(list(m.__path__)[0])' 2>/dev/null)"; do
        if [[ -n "$c" ]] && ls "$c"/nvvm/lib64/libnvvm.so* >/dev/null 2>&1; then echo "$c"; return 0; fi
    done
    return 1
}
nvvm_loads() { $PYTHON -c "from numba.cuda.cudadrv.nvvm import NVVM; NVVM()" >/dev/null 2>&1; }
if [[ -z "${CUDA_HOME:-}" ]] && ! nvvm_loads; then
    if ! CUDA_HOME=$(find_nvvm) && [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
        if [[ -n "${WHEELS:-}" && -d "${WHEELS}" ]]; then
            $PYTHON -m pip install -q --no-index --find-links "${WHEELS}" nvidia-cuda-nvcc-cu12 || true
        else
            timeout 60 $PYTHON -m pip install -q --disable-pip-version-check nvidia-cuda-nvcc-cu12 || true
        fi
        CUDA_HOME=$(find_nvvm) || CUDA_HOME=""
    fi
    if [[ -n "$CUDA_HOME" ]]; then export CUDA_HOME; else
        unset CUDA_HOME
        echo "MISSING: libNVVM (a CUDA toolkit, or nvidia-cuda-nvcc-cu12): the CUDA kernels cannot compile"
    fi
fi
echo "== CUDA_HOME=${CUDA_HOME:-}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

exec $PYTHON benchmarks/gpu/check.py "$@"
