# Sourced by test.sh and demo.sh (from the repository root): creates .venv if absent, installs
# torch==2.13.0's CPU build, then moekit editable with the extras in $1 (e.g. "[test]").
#
# torch comes from PyTorch's CPU index (TORCH_INDEX_URL, default below): a plain
# `pip install torch` on Linux takes PyPI's CUDA build, which pulls several GB of CUDA libraries
# and pins triton==3.7.1 (the test extras need triton>=3.8). TORCH_INDEX_URL= (empty) takes
# torch from pip's configured index instead, e.g. a local mirror that holds the CPU build.
PY=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/python -m pip install -q -e ".${1:-}"
