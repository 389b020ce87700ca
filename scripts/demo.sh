#!/usr/bin/env bash
# Runs the main job from nothing: creates .venv (if absent), installs torch==2.13.0's CPU build
# and moekit (scripts/_venv.sh says where torch comes from), then runs `moekit demo` with the
# arguments given (see `moekit demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh ""
exec .venv/bin/moekit demo "$@"
