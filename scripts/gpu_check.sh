#!/usr/bin/env bash
# The one GPU check: the Triton kernel's tests against the PyTorch reference, then bench/gpu_kernels.py.
# Needs only torch, triton and pytest (a CUDA machine's stock Python will do). Writes under ${OUT:-gpu-out}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tee "$OUT/gpu_tests.log"
tests=$?
timeout 300 python3 bench/gpu_kernels.py --out "$OUT/gpu_kernels.json" 2>&1 | tee "$OUT/gpu_kernels.log"
bench=$?
echo "tests rc=$tests bench rc=$bench"
exit $(( tests != 0 || bench != 0 ))
