#!/usr/bin/env bash
# Runs moekit's test suite from nothing: creates .venv (if absent), installs moekit with its
# test extras (torch==2.13.0 CPU wheel first so no CUDA build is pulled), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
export TRITON_INTERPRET=1          # Triton kernels run in the interpreter on CPU
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q "$@"
