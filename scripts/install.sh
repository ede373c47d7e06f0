#!/usr/bin/env bash
# Installs wavg_ext and everything it needs on a fresh machine, then builds it.
# Uses the torch already installed; on a machine without torch it installs the
# CPU build torch==2.13.0 (set WAVG_EXT_TORCH to choose another spec).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install "${WAVG_EXT_TORCH:-torch==2.13.0}"
fi
"$PY" -m pip install ninja numpy pytest pytest-benchmark hypothesis tqdm matplotlib scikit-learn
# Plain pip install: the build backend compiles against the torch installed above
# (build_backend/wavg_ext_build.py), not one fetched into pip's isolated environment.
"$PY" -m pip install .
# The same build, placed in the checkout too (it reuses the objects pip just compiled
# in ./build), so `python -m wavg_ext.bench` also works from the repository root,
# where the source tree shadows the installed package.
"$PY" setup.py -q build_ext --inplace
"$PY" -c "import wavg_ext, json; print(json.dumps(wavg_ext.build_info()))"
