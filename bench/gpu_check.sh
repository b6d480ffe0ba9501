#!/usr/bin/env bash
# GPU check of the fused kernels and the CUDA paths (issues 6, 5, 13, 15), for a machine with one or
# more GPUs, nvcc and no network. Steps, each under its own `timeout` (they sum to 420 s, so the
# whole check stays within 7 minutes; GPU time for a check is scarce):
#   env        torch, the GPU and nvcc
#   build      megalite from source (CPU + CUDA kernels, sm_80/sm_90; nothing compiled elsewhere)
#   tests      tests/test_ops.py's CUDA cases (norm rows up to 32768 wide, past the register
#              tiles' edges at 12288 and 16384), and tests/test_kernel_resources.py (every launch
#              fits the registers nvcc gives each kernel, with this machine's nvcc)
#   bench      the kernel benchmark (bf16 and fp32, norms at hidden 1024 to 16384, vs eager; no
#              torch.compile baseline: its compile time would not fit), % of copy bandwidth
#   nccl       a real NCCL process group: `megalite launch --num_gpus 1` (one local rank on one
#              GPU, RANK/WORLD_SIZE set) trains configs/tiny.yaml with --parallel.backend=nccl
#   zero-bf16, zero-fp16
#              ZeRO-3 with the optimizer offloaded to pinned CPU buffers, one process on one GPU
#              (no process group), bf16 and fp16 (loss scaling), 20 steps each
#   recompute  tests/test_recompute.py -k cuda: every recomputation mode bit-identical to none
#              with dropout on CUDA (fp32, bf16), activation bytes per layer vs the re-derived terms
#   plan-gpu   a ~0.8B GPT (16 x 2048, s=1024, bf16) for 4 steps on one GPU: the start-up line has
#              megalite plan's predicted peak, step 1 the measured max_memory_allocated beside
#              it, the step lines the MFU (issue 16's predicted-vs-measured on a GPU)
# A failed build stops the check (the other steps would test the PyTorch fallback); any other
# failure is reported and the next step runs. A summary (PASS/FAIL/TIMEOUT per step) ends it;
# the exit status is 1 when any step did not pass.
#
# Usage: bash bench/gpu_check.sh [--dry-run]   (--dry-run prints the steps and runs nothing)
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "error: bench/gpu_check.sh: unknown argument '$arg'; the only option is --dry-run" >&2
       exit 2 ;;
  esac
done

export PY=${PYTHON:-python}
export MEGALITE_CUDA=1            # a CUDA build failure is an error here, not a fallback
export MEGALITE_CUDA_KERNELS=1    # the models' CUDA path uses the kernels during the check
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")  # run dirs and logs, private to this user
export WORK

# name|timeout in seconds, in order; each step is the function step_<name with - as _>
STEPS=(
  "env|10"
  "build|100"
  "tests|70"
  "bench|45"
  "nccl|45"
  "zero-bf16|25"
  "zero-fp16|25"
  "recompute|45"
  "plan-gpu|55"
)

step_env() {
  "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "|",
    torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible")' &&
  nvcc --version | tail -1
}

step_build() {  # no isolation (torch and pybind11 are installed), no deps (no network)
  "$PY" -m pip install --no-build-isolation --no-deps -q -e . &&
  "$PY" -c 'import megalite._kernels_cuda, megalite._kernels_cpu as c
print("built; CPU ISA", c.isa())'
}

step_tests() {
  "$PY" -m pytest -q -x -p no:cacheprovider tests/test_ops.py -k "cuda or compile or opcheck" &&
  "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernel_resources.py
}

step_bench() {
  "$PY" bench/kernels.py --device cuda --dtypes bf16,fp32 --no-compile \
    --hidden 1024,4096,8192,12288,16384
}

step_nccl() {  # the launcher sets RANK/WORLD_SIZE=1, so train starts an NCCL process group
  set -o pipefail
  NCCL_DEBUG=VERSION "$PY" -m megalite.cli launch --num_gpus 1 -m megalite.train \
    --config configs/tiny.yaml --parallel.backend=nccl --run.dir="$WORK/nccl" \
    --run.tensorboard=false 2>&1 | tee "$WORK/nccl.log" &&
  grep -q "step 20/20 " "$WORK/nccl.log"
}

step_zero_bf16() {
  set -o pipefail
  "$PY" -m megalite.cli train --config configs/tiny.yaml --parallel.zero_stage=3 \
    --parallel.offload_optimizer=true --train.precision=bf16 --run.dir="$WORK/zero-bf16" \
    --run.tensorboard=false 2>&1 | tee "$WORK/zero-bf16.log" &&
  grep -q "step 20/20 " "$WORK/zero-bf16.log"
}

step_zero_fp16() {
  set -o pipefail
  "$PY" -m megalite.cli train --config configs/tiny.yaml --parallel.zero_stage=3 \
    --parallel.offload_optimizer=true --train.precision=fp16 --run.dir="$WORK/zero-fp16" \
    --run.tensorboard=false 2>&1 | tee "$WORK/zero-fp16.log" &&
  grep -q "step 20/20 " "$WORK/zero-fp16.log"
}
step_recompute() {  # issue 15: exact recomputation on CUDA, activation bytes vs re-derived
  "$PY" -m pytest -q -x -p no:cacheprovider tests/test_recompute.py -k cuda
}
step_plan_gpu() {  # issue 16: the planner's predicted peak vs a ~0.8B GPT's measured, and MFU
  set -o pipefail
  "$PY" -m megalite.cli train --config configs/tiny.yaml --model.num_layers=16 \
    --model.hidden_size=2048 --model.num_heads=16 --model.max_seq_len=1024 \
    --data.source=stdlib --data.tokenizer=bytes --data.seq_len=1024 \
    --train.micro_batch_size=4 --train.precision=bf16 --train.steps=4 --train.warmup_steps=1 \
    --train.eval_iters=1 --run.log_interval=1 --run.sample_tokens=0 --run.dir="$WORK/plan-gpu" \
    --run.tensorboard=false 2>&1 | tee "$WORK/plan-gpu.log" &&
  grep -q "memory measured in step 1" "$WORK/plan-gpu.log" && grep -q "step 4/4 " "$WORK/plan-gpu.log"
}
export -f step_env step_build step_tests step_bench step_nccl step_zero_bf16 step_zero_fp16 \
  step_recompute step_plan_gpu

total=0
for entry in "${STEPS[@]}"; do total=$(( total + ${entry#*|} )); done

if [ "$dry_run" = 1 ]; then
  echo "gpu_check steps (timeouts sum to ${total} s):"
  for entry in "${STEPS[@]}"; do
    name=${entry%|*} limit=${entry#*|}
    echo "== step $name (timeout ${limit} s)"
    declare -f "step_${name//-/_}" | sed '1,2d;$d'
  done
  rmdir "$WORK"
  exit 0
fi

start=$(date +%s)
summary=()
failed=0
build_failed=0
for entry in "${STEPS[@]}"; do
  name=${entry%|*} limit=${entry#*|}
  if [ "$build_failed" = 1 ]; then
    summary+=("$(printf '%-10s NOT RUN (build failed)' "$name")")
    continue
  fi
  echo "== step $name (timeout ${limit} s)"
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c "step_${name//-/_}"
  rc=$?
  took=$(( $(date +%s) - t0 ))
  if [ "$rc" = 0 ]; then
    result=PASS
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    result="TIMEOUT after ${limit} s"
  else
    result="FAIL (exit $rc)"
  fi
  [ "$rc" = 0 ] || failed=1
  [ "$rc" != 0 ] && [ "$name" = build ] && build_failed=1
  summary+=("$(printf '%-10s %-22s %4d s' "$name" "$result" "$took")")
done

echo "== gpu_check summary ($(( $(date +%s) - start )) s; logs and run dirs in $WORK)"
printf '  %s\n' "${summary[@]}"
exit "$failed"
