"""benchmarks/bench_kernels.py runs: a clean exit without CUDA, and a tiny --cpu-smoke run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_exits_cleanly_without_cuda():
    stdout, res = _run()
    assert res["status"] == "skipped" and "no CUDA" in stdout


def test_cpu_smoke_runs():
    stdout, res = _run("--cpu-smoke", "--shapes", "smoke_a", "--tokens", "8", "--warmup", "0", "--reps", "1")
    assert res["status"] == "ok" and res["smoke"]
    (case,) = res["results"]
    for v in ("triton", "grouped_mm", "loop", "dense"):
        assert "fwd" in case["variants"][v] and "fwdbwd" in case["variants"][v], v
    assert case["variants"]["triton"]["rel_err_vs_loop"] < 1e-5
