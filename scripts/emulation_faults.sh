#!/usr/bin/env bash
# Proves that the emulated CUDA tests can fail: for each patch in scripts/faults/ (a bug
# injected into the device code), builds a scratch copy of the checkout with the patch,
# runs every emulated test (pytest -k emulated, and tests/test_cuda_emulation.py) and
# lists the tests it fails. Exits 1 if some fault fails no test.
#
#   bash scripts/emulation_faults.sh [summary file]     (~15 min on 2 cores)
#
# Not part of CI: run it after changing the emulator or the kernels' tests, and keep
# the summary in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${WAVG_EXT_FAULT_DIR:-/tmp/wavg_ext_faults}
SUMMARY=${1:-$WORK/summary.txt}
PY=${PYTHON:-python}

# The scratch copy keeps its build folder between runs (WAVG_EXT_FAULT_FRESH=1: start over).
[ "${WAVG_EXT_FAULT_FRESH:-0}" = 1 ] && rm -rf "$WORK"
mkdir -p "$WORK/src"
if [ -d "$WORK/src/.git" ]; then git -C "$WORK/src" checkout -q -- .; fi
# Copy the tracked files that differ (a fresh mtime, so that ninja rebuilds what they touch).
rm -rf "$WORK/stage" && mkdir -p "$WORK/stage"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$WORK/stage"
(cd "$WORK/stage" && find . -type f -print0) | while IFS= read -r -d '' f; do
  if ! cmp -s "$WORK/stage/$f" "$WORK/src/$f"; then
    mkdir -p "$(dirname "$WORK/src/$f")" && cp "$WORK/stage/$f" "$WORK/src/$f"
  fi
done
cd "$WORK/src"
[ -d .git ] || git init -q
git add -A && git -c user.name=faults -c user.email=faults@localhost commit -qm base --allow-empty

build() { WAVG_EXT_CUDA_EMULATION=1 "$PY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1; }
run_tests() {
  # (not the check that the patches apply: under a fault, its patch is applied already)
  "$PY" -m pytest tests -q -p no:cacheprovider \
    -k "(emulated or test_cuda_emulation) and not test_the_injected_faults_still_apply" \
    -o addopts="" -rf --tb=no "$@" 2>&1 | tail -n +1
}

echo "== baseline build and emulated tests (must pass)"
build
if ! run_tests >"$WORK/baseline.log"; then
  echo "the emulated tests fail without any fault: see $WORK/baseline.log" >&2
  exit 1
fi
tail -1 "$WORK/baseline.log"

: >"$SUMMARY"
uncaught=0
for patch in "$ROOT"/scripts/faults/*.patch; do
  name=$(basename "$patch" .patch)
  echo "== $name"
  git checkout -q -- .
  git apply "$patch"
  if ! build; then
    echo "$name: does not build (see $WORK/build.log)" | tee -a "$SUMMARY"
    uncaught=1
    continue
  fi
  run_tests >"$WORK/$name.log" || true
  # failing tests, counted per test function (parameters stripped)
  { grep '^FAILED' "$WORK/$name.log" || true; } | sed 's/^FAILED //; s/ - .*//; s/\[.*//' | sort | uniq -c |
    sort -rn >"$WORK/$name.failed"
  failed=$({ grep -c '^FAILED' "$WORK/$name.log" || true; })
  {
    echo "$name: $(head -1 "$patch" | sed 's/^# Fault: //')"
    echo "  $(tail -1 "$WORK/$name.log")"
    awk 'NR <= 25 { printf "  %5d  %s\n", $1, $2 } END { if (NR > 25) printf "  ... and %d more test functions\n", NR - 25 }' \
      "$WORK/$name.failed"
  } | tee -a "$SUMMARY"
  if [ "$failed" -eq 0 ]; then uncaught=1; fi
done
git checkout -q -- .
echo "summary: $SUMMARY"
exit $uncaught
