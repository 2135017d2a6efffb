#!/usr/bin/env bash
# On a CUDA machine: the tests that run the Triton kernels on the GPU, then the GPU benchmarks
# (benchmarks/attention_gpu.py, benchmarks/gemm.py), each stage under its own time limit so the
# whole script stays under 8 minutes. Everything it prints also goes to one folder:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]      # default: $OUT if set, else benchmarks/out/gpu
#
# Made for the device machines lent to this project (torch and triton preinstalled, no network):
# it installs this package without dependencies (editable), or, if pip cannot, puts a tree of
# links that maps the four source folders onto the xy_inductor namespace on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/out/gpu}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: needs a CUDA device (torch.cuda.is_available() is False)" >&2
    exit 2
fi

if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT_DIR/install.txt" 2>&1; then
    tree=$(mktemp -d)
    mkdir -p "$tree/xy_inductor"
    cp -r xy_inductor/. "$tree/xy_inductor/"
    for folder in lowering runtime kernels; do ln -s "$PWD/$folder" "$tree/xy_inductor/$folder"; done
    export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install failed (see install.txt); using the link tree $tree" | tee -a "$OUT_DIR/install.txt"
fi

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT_DIR/device.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, keep its output, note its status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    local status=${PIPESTATUS[0]}
    echo "$name: exit $status after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT_DIR/summary.txt"
}

stage tests 200 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/test_triton_gemm.py tests/test_triton_attention.py tests/test_attention_varlen.py \
    tests/test_ops.py
stage attention_gpu 100 "$PY" benchmarks/attention_gpu.py
stage gemm 150 "$PY" benchmarks/gemm.py --rounds 3 --plot "$OUT_DIR/gemm_cuda_bf16.png"
cat "$OUT_DIR/summary.txt"
