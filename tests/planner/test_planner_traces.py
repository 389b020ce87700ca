"""Trace reader/writer: moekit .npz, route_trace v1 CSV, Mixtral JSON; errors name file, line and reason."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moekit.planner import RoutingTrace, TraceFormatError, concat_traces, read_trace


def _trace(weights=True, T=5, L=3, K=2, E=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = [np.stack([rng.choice(E, K, replace=False) for _ in range(T)]).astype(np.int32) for _ in range(L)]
    ids[1][0, 1] = -1
    ws = [rng.random((T, K)).astype(np.float32) for _ in range(L)] if weights else None
    return RoutingTrace(ids, ws, E, {"model": "toy", "expert_bytes": [10, 20, 30]})


@pytest.mark.parametrize("weights", [True, False])
def test_npz_roundtrip(tmp_path, weights):
    tr = _trace(weights)
    p = tmp_path / "t.npz"
    tr.save(p)
    back = read_trace(p)
    assert back.num_layers == 3 and back.top_k == 2 and back.num_experts == 6 and back.aligned
    for a, b in zip(tr.topk_ids, back.topk_ids):
        assert b.dtype == np.int32 and np.array_equal(a, b)
    if weights:
        for a, b in zip(tr.topk_weights, back.topk_weights):
            assert b.dtype == np.float32 and np.array_equal(a, b)
    else:
        assert back.topk_weights is None
    assert back.meta["model"] == "toy" and back.meta["expert_bytes"] == [10, 20, 30]
    z = np.load(p)
    assert str(z["format"]) == "moekit-trace" and int(z["version"]) == 1
    hdr = json.loads(str(z["meta_json"]))
    assert hdr["num_experts"] == 6 and hdr["top_k"] == 2 and hdr["num_layers"] == 3 and hdr["aligned"] is True


def test_npz_unaligned_flag(tmp_path):
    tr = _trace()
    tr.meta["aligned"] = False
    tr.save(tmp_path / "u.npz")
    assert not read_trace(tmp_path / "u.npz").aligned
    ragged = RoutingTrace([np.zeros((3, 2), np.int32), np.zeros((4, 2), np.int32)], None, 2)
    assert not ragged.aligned


def test_npz_bad_version_and_foreign(tmp_path):
    tr = _trace()
    p = tmp_path / "v2.npz"
    tr.save(p)
    d = dict(np.load(p))
    d["version"] = np.array(2)
    with open(p, "wb") as f:
        np.savez_compressed(f, **d)
    with pytest.raises(TraceFormatError, match="unsupported moekit trace version 2"):
        read_trace(p)
    q = tmp_path / "other.npz"
    with open(q, "wb") as f:
        np.savez(f, a=np.zeros(3))
    with pytest.raises(TraceFormatError, match="not a moekit trace"):
        read_trace(q)


def test_trace_validation():
    with pytest.raises(ValueError, match="outside"):
        RoutingTrace([np.array([[0, 9]])], None, 4)
    with pytest.raises(ValueError, match="same top-k"):
        RoutingTrace([np.zeros((2, 2), int), np.zeros((2, 3), int)], None, 4)
    with pytest.raises(ValueError, match="2-D"):
        RoutingTrace([np.zeros(3, int)], None, 4)


CSV = """# route_trace v1
# model=toy.gguf arch=toy n_layer=2 n_expert=4 n_expert_used=2
# layer=0 expert_bytes=100 dense_bytes=5
# layer=1 expert_bytes=200 dense_bytes=5
turn,phase,step,layer,slot,expert,weight,residency,expert_bytes
0,0,0,0,0,1,0.6,0,100
0,0,0,0,1,2,0.4,0,100
0,0,1,0,0,3,0.7,0,100
0,0,1,0,1,0,0.3,0,100
0,0,1,1,0,2,0.5,1,0
0,0,1,1,1,1,0.5,1,0
0,1,0,0,0,0,0.9,0,100
0,1,0,0,1,1,0.1,0,100
0,1,0,1,0,3,0.8,0,200
0,1,0,1,1,0,0.2,0,200
"""


def test_route_csv(tmp_path):
    p = tmp_path / "t.route.csv"
    p.write_text(CSV)
    tr = read_trace(p)
    assert tr.num_layers == 2 and tr.num_experts == 4 and tr.top_k == 2 and tr.aligned
    # tokens in order of first appearance: (0,0,0), (0,0,1), (0,1,0); token 0 lacks layer 1
    assert tr.topk_ids[0].tolist() == [[1, 2], [3, 0], [0, 1]]
    assert tr.topk_ids[1].tolist() == [[-1, -1], [2, 1], [3, 0]]
    assert np.allclose(tr.topk_weights[1][2], [0.8, 0.2])
    assert tr.meta["expert_bytes"] == [100, 200]


@pytest.mark.parametrize("bad,line,msg", [
    ("0,0,0,0,0,1,0.6,0\n", 6, "expected 9 fields"),
    ("0,0,0,0,0,x,0.6,0,100\n", 6, "non-numeric"),
    ("0,0,0,0,0,7,0.6,0,100\n", 6, "expert 7 >= 4"),
])
def test_route_csv_errors(tmp_path, bad, line, msg):
    lines = CSV.splitlines(keepends=True)
    p = tmp_path / "bad.csv"
    p.write_text("".join(lines[:5]) + bad + "".join(lines[6:]))
    with pytest.raises(TraceFormatError, match=msg) as ei:
        read_trace(p)
    assert ei.value.line == line and str(p) in str(ei.value) and f"line {line}" in str(ei.value)


def test_route_csv_version(tmp_path):
    p = tmp_path / "v.csv"
    p.write_text(CSV.replace("route_trace v1", "route_trace v9"))
    with pytest.raises(TraceFormatError, match="unsupported route_trace version"):
        read_trace(p)


def test_mixtral_json(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"0": [[0, 1], [2, 3]], "1": [[1, 2], [3, 0]]}))
    tr = read_trace(p)
    assert tr.num_layers == 2 and tr.num_experts == 4 and tr.top_k == 2 and tr.aligned
    assert tr.topk_weights is None and tr.topk_ids[1].tolist() == [[1, 2], [3, 0]]


@pytest.mark.parametrize("text,line,msg", [
    ('{"0": [[0, 1],\n [2, 3]],\n "1": [[1, 2] [3, 0]]}', 3, "invalid JSON"),
    ('{"0": [[0, 1], [2]],\n "1": [[1, 2], [3, 0]]}', 1, "layer 0"),
    ('{"0": [[0, 1]],\n "x": [[1, 2]]}', 2, "not an integer"),
    ('{"0": [[0, 1]], "2": [[1, 2]]}', 1, "layer keys"),
])
def test_mixtral_json_errors(tmp_path, text, line, msg):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(TraceFormatError, match=msg) as ei:
        read_trace(p)
    assert ei.value.line == line


def test_unknown_and_missing(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("hello")
    with pytest.raises(TraceFormatError, match="unrecognised"):
        read_trace(p)
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "nope.json")


def test_concat_and_slices():
    a, b = _trace(seed=1), _trace(seed=2)
    c = concat_traces([a, b])
    assert c.num_tokens == [10, 10, 10] and c.aligned
    assert c.layers([0, 2]).meta["expert_bytes"] == [10, 30]
    assert c.tokens(2, 4).num_tokens == [2, 2, 2]


def test_shared_traces(shared_traces):
    q = read_trace(shared_traces / "qwen.route.csv")
    assert (q.num_layers, q.num_experts, q.top_k) == (48, 128, 6) and q.aligned
    assert q.num_tokens[0] == 156 and len(q.meta["expert_bytes"]) == 48
    # llama.cpp skips the last layer for prompt tokens but the last: those rows are -1
    assert (q.topk_ids[47] < 0).all(axis=1).sum() == 27
    g = read_trace(shared_traces / "gemma.route.csv")
    assert (g.num_layers, g.num_experts, g.top_k) == (30, 128, 6) and g.num_tokens[0] == 157
    m = read_trace(shared_traces / "mixtral" / "experts_math_mixtral.json")
    assert (m.num_layers, m.num_experts, m.top_k) == (32, 8, 2) and m.num_tokens[0] == 10307 and m.aligned


def test_trace_stats_normalises_lists_once():
    """A list of traces is concatenated, the trace kept for per-batch metrics, and a TraceStats
    passes through untouched (the planner normalises its input once, then hands this on)."""
    from moekit.planner import TraceStats, trace_stats
    a, b = _trace(seed=1), _trace(seed=2)
    st = trace_stats([a, b])
    whole = trace_stats(concat_traces([a, b]))
    assert np.array_equal(st.loads, whole.loads) and np.array_equal(st.trans, whole.trans)
    assert st.trace.num_tokens == [10, 10, 10] and st.expert_bytes == [10, 20, 30]
    assert trace_stats(st) is st
    assert trace_stats(st.loads).trace is None and isinstance(trace_stats(st.loads), TraceStats)


def test_plan_and_compare_compute_stats_once(monkeypatch):
    """compare_placements: transitions (a pass over every token) once for the planning traces and
    once for the scoring trace, not once per method and score."""
    from moekit import planner as P
    from moekit.planner import stats as stats_mod
    calls = []
    real = stats_mod.transitions
    monkeypatch.setattr(stats_mod, "transitions", lambda tr: calls.append(tr.num_tokens) or real(tr))
    train, test = [_trace(seed=s, T=40) for s in (1, 2)], _trace(seed=3, T=30)
    res = P.compare_placements(train, 2, methods=("contiguous", "greedy", "ilp"), time_limit=2, n_jobs=1,
                               score_on=test)
    assert calls == [[80, 80, 80], [30, 30, 30]]
    assert all(r.metrics_out_of_sample is not None and "cross_gpu_frac" in r.metrics for r in res)
    # planning on the stats gives what planning on the traces gives
    st = P.trace_stats(train)
    one = P.plan_placement(st, 2, solver="greedy", score_on=P.trace_stats(test))
    assert one.metrics == res[1].metrics and one.metrics_out_of_sample == res[1].metrics_out_of_sample


def test_automatic_batch_size():
    """256 tokens per batch on long traces; T/8 (>= 8) on short ones so percentiles still exist;
    the out-of-sample score uses the planning trace's batch size."""
    from moekit import planner as P
    assert P.auto_batch_size(12138) == 256 and P.auto_batch_size(2048) == 256
    assert P.auto_batch_size(156) == 19 and P.auto_batch_size(20) == 8
    res = P.plan_placement(_trace(T=160), 2, solver="greedy", score_on=_trace(seed=5, T=400))
    assert res.metrics["batch_size"] == 20 and res.metrics["num_batches"] == 8
    assert res.metrics_out_of_sample["batch_size"] == 20 and res.metrics_out_of_sample["num_batches"] == 20
    assert P.plan_placement(_trace(T=160), 2, solver="greedy", batch_size=40).metrics["num_batches"] == 4
    assert "batch_size" not in P.plan_placement(P.expert_loads(_trace()), 2, solver="greedy").metrics
    with pytest.raises(P.PlanInputError, match="batch_size must be a positive integer, got 0"):
        P.plan_placement(_trace(), 2, solver="greedy", batch_size=0)
