#!/usr/bin/env bash
# The one-shot GPU check, for a fresh H100/H200 machine with a CUDA build of torch and
# nvcc but no network (the device tool's machine): builds the CUDA kernels in place,
# runs the CUDA tests, compute-sanitizer memcheck and racecheck on a reduced set
# (scripts/device_cases.py), and the GPU benchmark (fused ops vs torch._foreach_lerp_
# and AveragedModel, with the device-to-device copy ceiling measured in the same run,
# on GPT-2-small shapes fp32 and bf16 params with fp32 averages and 2000x512; project_
# with k=10). Writes every log, the benchmark JSON and summary.md to the output folder
# and prints the summary table last. Planned for under 8 minutes on 16 cores; each
# stage has a time limit, and a failed stage does not stop the later ones.
#
#   bash scripts/gpu_check.sh [OUTPUT_DIR]      (default: $OUT, else ./gpu_check_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-$PWD/gpu_check_out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export WAVG_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
T0=$(date +%s)
STATUS="$OUT_DIR/stages.txt"
: >"$STATUS"

# stage NAME LIMIT_S COMMAND...: runs with a time limit, logs to $OUT_DIR/NAME.log.
stage() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s, at $(( $(date +%s) - T0 ))s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  [ $rc -eq 0 ] || verdict="FAILED rc=$rc"
  [ $rc -eq 124 ] && verdict="TIMED OUT"
  printf '%-18s %-14s %4ss  %s\n' "$name" "$verdict" $(( SECONDS - start )) "$OUT_DIR/$name.log" | tee -a "$STATUS"
  tail -3 "$OUT_DIR/$name.log" | sed 's/^/    /'
  return $rc
}

stage environment 60 bash -c "nvidia-smi; nvcc --version; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; nproc; free -g"

if ! stage build 300 "$PY" setup.py build_ext --inplace; then
  echo "build failed: see $OUT_DIR/build.log"
  tail -40 "$OUT_DIR/build.log"
  exit 1
fi
# The CUDA kernels are their own module (_C_cuda), loaded under a torch with CUDA: say so.
if ! "$PY" -c "
import json, sys, wavg_ext
info = wavg_ext.build_info()
print(json.dumps(info))
sys.exit(0 if info['cuda'] else 'CUDA kernels not loaded: ' + info['cuda_status'])" | tee "$OUT_DIR/build_info.json"; then
  echo "the CUDA kernels did not load: see $OUT_DIR/build_info.json"
  exit 1
fi

# The CUDA tests: every device-parametrized test on "cuda", the sync-free and graph tests.
stage tests 180 "$PY" -m pytest tests -q -m cuda -p no:cacheprovider -o addopts="" -rf \
  --junitxml="$OUT_DIR/tests.xml"

# Each tensor its own allocation, so that an access past a tensor is past an allocation.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
stage memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" scripts/device_cases.py
stage racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" scripts/device_cases.py
unset PYTORCH_NO_CUDA_MEMORY_CACHING

stage bench_ops 150 "$PY" -m wavg_ext.bench --suite ops --device cuda --cases ema_-gpt2,ema_-many_small \
  --json "$OUT_DIR/bench_ops.json"
stage bench_project 120 "$PY" -m wavg_ext.bench --suite twa --device cuda --cases project_-gpt2-k10 \
  --json "$OUT_DIR/bench_project.json"
stage bench_dropin 90 "$PY" -m wavg_ext.bench --suite dropin --device cuda --repeats 10 --cases gpt2 \
  --json "$OUT_DIR/bench_dropin.json"

"$PY" scripts/gpu_summary.py "$OUT_DIR" | tee "$OUT_DIR/summary.md"
echo "total $(( $(date +%s) - T0 ))s; logs in $OUT_DIR"
! grep -q -E "FAILED|TIMED OUT" "$STATUS"
