#!/usr/bin/env bash
# Runs the whole test suite against the installed package (plain `pytest`, not
# `python -m pytest`, so the source tree does not shadow the installed build), then
# the op tests again on the CPU kernels of every other vector ISA this CPU supports
# (the first run uses the best one; torch's own kernels are set to the same ISA so that
# the bit-identity tests against torch keep running).
set -euo pipefail
cd "$(dirname "$0")/.."
pytest tests benchmarks --benchmark-disable -q "$@"

OP_TESTS=(tests/test_all_ops.py tests/test_running_mean.py tests/test_ema.py tests/test_ema_many.py tests/test_window_push.py
          tests/test_accumulate.py
          tests/test_scale_copy.py tests/test_compensated.py tests/test_dots.py tests/test_combine.py
          tests/test_project.py tests/test_orthonormalize.py tests/test_orthonormalize_many.py
          tests/test_dispatch.py tests/test_validation.py)
isas=$(cd /tmp && python -c "from wavg_ext import testing; print(' '.join(testing.supported_cpu_capabilities()[:-1]))")
for isa in $isas; do
  echo "== op tests on the CPU kernels for $isa"
  WAVG_EXT_CPU_CAPABILITY=$isa ATEN_CPU_CAPABILITY=$isa \
    pytest "${OP_TESTS[@]}" -q -m "not cuda_emulation and not cuda" "$@"
done
