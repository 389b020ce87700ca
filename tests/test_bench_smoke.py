"""Smoke test: ``benchmarks/bench_layer.py --quick`` runs and ends with one JSON line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_layer_quick_ends_with_json():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_layer.py"), "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "bench_layer"
    assert summary["machine"]["torch_threads"] >= 1
    for shape in summary["results"].values():
        moekit = shape["variants"]["moekit"]
        assert moekit["fwd_ms"] > 0 and moekit["fwdbwd_ms"] > 0
        assert shape["floor"]["fwd"]["ms"] > 0
        for name, v in shape["variants"].items():  # every peer ran and matched, or says why not
            assert "skipped" in v or "fwd_ms" in v, name


def test_bench_cpu_reuse_quick_ends_with_json():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_cpu_reuse.py"), "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "bench_cpu_reuse" and summary["memory"]["fill_fresh"] > 0
    for shape in summary["results"].values():
        assert shape["schedule_picked"] in ("inline", "workers")
        for mode in ("fwd", "fwdbwd"):
            r = shape["modes"][mode]
            assert set(r["x_floor"]) == {"moekit", "moekit_no_pool", "moekit_other_schedule"}
            assert r["pool_gain"] > 0 and r["schedule_gain"] > 0
