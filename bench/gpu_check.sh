#!/usr/bin/env bash
# GPU check of the fused kernels (issue 6), for a machine with a GPU, nvcc and no network:
#   1. build megalite from source (CPU + CUDA kernels, sm_80/sm_90; nothing compiled elsewhere),
#   2. run tests/test_ops.py, whose CUDA cases run here (CPU cases too),
#   3. run the kernel benchmark on the GPU (bf16 and fp32, vs eager and torch.compile, % of the
#      copy bandwidth measured in the same run),
#   4. ZeRO on CUDA (issue 5), one GPU so dp=1: ZeRO-3 with the optimizer offloaded to pinned CPU
#      buffers, bf16 and fp16 (loss scaling), 20 steps each (fails when a run fails).
# Usage: bash bench/gpu_check.sh            (about 3-4 minutes; exits non-zero on any failure)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python}

echo "== gpu_check: $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())')"
echo "== nvcc: $(nvcc --version | tail -1)"

# 1. build: no isolation (torch and pybind11 are installed), no deps (no network)
export MEGALITE_CUDA=1   # a CUDA build failure is an error here, not a fallback
export MAX_JOBS=${MAX_JOBS:-16}
$PY -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | grep -v "^\s*$" | tail -5
$PY -c "import megalite._kernels_cuda, megalite._kernels_cpu as c; print('== built; CPU ISA', c.isa())"
echo "== build done in $(( $(date +%s) - start )) s"

# 2. tests: the CUDA cases are not skipped here; the models' CUDA path is enabled for the check
export MEGALITE_CUDA_KERNELS=1
timeout 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_ops.py -k "cuda or compile or opcheck"
echo "== tests done at $(( $(date +%s) - start )) s"

# 3. benchmark (forward and backward; torch.compile forward)
timeout 150 $PY bench/kernels.py --device cuda --dtypes bf16,fp32

# 4. ZeRO-3 + offload on CUDA (NCCL, one rank)
for precision in bf16 fp16; do
  timeout 120 $PY -m megalite.cli train --config configs/tiny.yaml --parallel.zero_stage=3 \
    --parallel.offload_optimizer=true --train.precision=$precision --run.dir=/tmp/gpu-zero-$precision \
    --run.tensorboard=false 2>&1 | grep -E "model states|step 20|validation|error" || exit 1
done
echo "== gpu_check finished in $(( $(date +%s) - start )) s"
