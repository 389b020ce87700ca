#!/usr/bin/env bash
# Runs the main job from nothing: creates .venv (if absent), installs moekit, runs `moekit demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e .
exec .venv/bin/moekit demo "$@"
