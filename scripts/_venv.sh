# Sourced by test.sh and demo.sh (from the repository root): creates .venv if absent, installs
# torch==2.13.0 first, then moekit editable with the extras in $1 (e.g. "[test]").
#
# torch comes from pip's configured index unless TORCH_INDEX_URL names another one. On a stock
# Linux machine pip's index is PyPI, whose torch is the CUDA build (several GB of CUDA libraries,
# and it pins triton==3.7.1 while the test extras need triton>=3.8): there, set
# TORCH_INDEX_URL to PyTorch's CPU index (see the README) to get the CPU build.
PY=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL-}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/python -m pip install -q -e ".${1:-}"
