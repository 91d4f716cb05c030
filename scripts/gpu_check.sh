#!/usr/bin/env bash
# The one GPU check: the Triton kernel's tests against the PyTorch reference, bench/gpu_kernels.py, then
# bench/gpu_train.py (the 100M scale point's DLRM and the HSTU step with the Triton kernel, through the
# project's training step on one device). The first two need only torch, triton and pytest (a CUDA
# machine's stock Python will do); the third also torchrec and a CUDA fbgemm-gpu, and says so (rc 3) when
# they are missing. Writes under ${OUT:-gpu-out}.
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
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true  # offline: adsfm itself
timeout 240 python3 bench/gpu_train.py --out "$OUT/gpu_train.json" 2>&1 | tee "$OUT/gpu_train.log"
train=${PIPESTATUS[0]}
echo "tests rc=$tests bench rc=$bench train rc=$train (3: torchrec/fbgemm-gpu missing there)"
exit $(( tests != 0 || bench != 0 || (train != 0 && train != 3) ))
