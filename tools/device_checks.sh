#!/usr/bin/env bash
# The checks that need the GPU machine (an NVIDIA H100/H200 with 16 Intel cores and no
# network; ../shared/DEVICE.md), as one bounded run of about 9 minutes:
#
#   1. whether the cuda backend reports the machine's own NumPy 2.5 as unusable (not crash);
#   2. the CUDA tests on the real GPU: kernels, glue, CuPy / PyTorch / Numba device arrays,
#      the deformable blocks on device arrays;
#   3. the deform tests with NPATTN_BACKEND=cuda;
#   4. the whole suite but tests/cudasim on the Intel CPU (portability of the fixtures);
#   5. tools/bench_gpu.py (npattn on device arrays beside torchvision CUDA);
#   6. tools/bench.py --scaling (1..16 threads, with each piece's speed-up).
#
# Before, where pip reaches PyPI (the GPU machine's NumPy 2.5 breaks numba-cuda 0.30.4):
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl numpy==2.4.6
# and keep .whl/ out of git (echo /.whl/ >> .git/info/exclude). Then, on the machine,
# from the repository root: bash tools/device_checks.sh (figures go to $OUT when set).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/npattn-device}
mkdir -p "$OUT"
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
step "machine"
nvidia-smi -L
lscpu | grep -E "Model name|^CPU\(s\)"
step "numpy as installed: the cuda backend must say why it cannot run, not crash"
PYTHONPATH=$PWD NUMBA_CACHE_DIR=/tmp/nbc0 timeout 60 python3 -c "
from npattn import sampling
print('cuda backend:', str(sampling.available_backends()['cuda'])[:400])
"
ls .whl/*.whl > /dev/null 2>&1 || { echo "no .whl/numpy wheel: see the header of this script"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NUMBA_CACHE_DIR=/tmp/nbc PYTHONUNBUFFERED=1
python3 -c "import numpy, numba, sys; print(sys.version.split()[0], 'numpy', numpy.__version__, 'numba', numba.__version__)"
step "CUDA tests on the GPU"
timeout 150 python3 -m pytest tests/cudasim tests/test_cuda_ptx.py -q -p no:cacheprovider 2>&1 | tail -15
step "deform tests with NPATTN_BACKEND=cuda"
NPATTN_BACKEND=cuda timeout 60 python3 -m pytest tests/test_deform_conv.py tests/test_deform_blocks.py \
  tests/test_border_grad.py -q -p no:cacheprovider 2>&1 | tail -6
step "whole suite but tests/cudasim on this CPU"
timeout 150 python3 -m pytest -q -p no:cacheprovider -n 12 --ignore=tests/cudasim 2>&1 | tail -12
step "bench_gpu"
timeout 90 python3 tools/bench_gpu.py --repeat 10 --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt" | tail -40
step "CPU scaling"
timeout 120 python3 tools/bench.py --scaling --quick --json "$OUT/scaling.json" 2>&1 | tee "$OUT/scaling.txt" | tail -30
step "done"
