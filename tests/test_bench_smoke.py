"""Smoke test: ``benchmarks/bench_layer.py --quick`` runs and ends with one JSON line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_layer_quick_ends_with_json():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_layer.py"), "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "bench_layer" and summary["fair_allocator"] == "neutral"
    assert summary["machine"]["torch_threads"] >= 1
    assert set(summary["allocators"]) == {"default", "neutral"}
    assert "MALLOC_MMAP_MAX_=0" in summary["allocators"]["neutral"]["allocator_env"]
    assert summary["allocators"]["default"]["allocator_env"] == "glibc defaults"
    for run in summary["allocators"].values():
        for shape in run["results"].values():  # every variant ran under this one setting
            moekit = shape["variants"]["moekit"]
            assert moekit["fwd_ms"] > 0 and moekit["fwdbwd_ms"] > 0
            assert shape["floor"]["fwd"]["ms"] > 0
            for name, v in shape["variants"].items():  # every peer ran and matched, or says why not
                assert "skipped" in v or "fwd_ms" in v, name


def test_bench_ep_quick_sends_only_routed_rows():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_ep.py"), "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    by_w = {r["W"]: r for r in summary["results"]}
    assert by_w[1]["bytes_rows_per_rank_step"] == 0
    assert by_w[2]["bytes_min_per_rank_step"] > 0 and by_w[2]["byte_ratio"] == 1.0


def test_bench_adaptive_quick_times_every_degree():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_adaptive.py"), "--quick", "--world", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in summary["results"]:
        degrees = {"0", "1", "2"} if r["E"] < summary["world"] else {"0", "1"}
        assert set(r["ms"]) == degrees and set(r["est_ms"]) == degrees, r
        assert str(r["auto_r"]) in degrees and r["auto_over_best"] >= 1.0


def test_bench_offload_e2e_quick_runs_every_variant():
    """``bench_offload.py --e2e --quick``: moekit, its LRU baseline and transformers + accelerate
    on a tiny saved model, same tokens, page cache dropped (bytes really come from the device)."""
    import pytest

    pytest.importorskip("accelerate")
    pytest.importorskip("transformers", minversion="5.0")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_offload.py"), "--e2e", "--quick"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "offload_e2e" and summary["machine"]["logical_cpus"] >= 1
    assert set(summary["variants"]) == {"moekit", "lru", "accelerate"}
    for name, v in summary["variants"].items():
        assert v["tokens_per_s"] > 0 and v["decode_tokens_per_s"] > 0, name
    assert summary["checks"]["same_tokens"] is True
    assert summary["variants"]["lru"]["options"]["policy"] == "lru"
    assert summary["variants"]["accelerate"]["accelerate_param_bytes_offloaded"] > 0  # it did offload
    assert set(summary["ratios"]) >= {"moekit_over_lru", "moekit_over_accelerate"}


def test_bench_overlap_smoke_reports_every_scheme():
    """``bench_overlap.py --smoke``: a tiny layer at W=2 (shaped link where it can be built, else
    loopback): every scheme and chunk count timed, the three times and the hidden fraction each."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_overlap.py"), "--smoke"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "overlap" and len(summary["results"]) == 1
    res = summary["results"][0]
    for scheme in ("chunked", "fine"):
        assert res[scheme]["auto_chose"] in (1, 2, 4, 8)
        assert res[scheme]["best_fixed_fwd_ms"] > 0 and res[scheme]["auto_fwd_ms"] > 0
