#!/usr/bin/env bash
# Runs moekit's test suite from nothing: creates .venv (if absent), installs torch==2.13.0's CPU
# build and moekit with its test extras (scripts/_venv.sh says where torch comes from), then
# runs pytest with the arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh "[test]"
export TRITON_INTERPRET=1          # Triton kernels run in the interpreter on CPU
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# -P: the repository root stays off sys.path (its kernels/ folder, the source of moekit.kernels,
# would shadow the kernels distribution that transformers imports)
exec .venv/bin/python -P -m pytest -q "$@"
