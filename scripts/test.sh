#!/usr/bin/env bash
# Runs the whole test suite against the installed package (plain `pytest`, not
# `python -m pytest`, so the source tree does not shadow the installed build).
set -euo pipefail
cd "$(dirname "$0")/.."
exec pytest tests benchmarks --benchmark-disable -q "$@"
