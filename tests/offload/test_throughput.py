"""Throughput model (moekit.offload.throughput): the decode-step arithmetic on given inputs, the
bound, the miss decision (copy vs compute where the expert lives) on given rates, calibration of a
real offloaded model, and `moekit run --json` carrying the prediction next to the measurement."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moekit.offload.throughput import MissCostModel, ModelShape, Rates, distinct_experts, predict_decode

MiB = 1 << 20


def _rates(**kw):
    base = dict(read_bandwidth=100 * MiB, dense_seconds=0.010, expert_seconds=0.001)
    base.update(kw)
    return Rates(**base)


def test_distinct_experts():
    assert distinct_experts(8, 2, 1) == pytest.approx(2.0)
    assert distinct_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75 ** 2))   # 3.5
    assert distinct_experts(64, 8, 1000) == pytest.approx(64.0)


def test_decode_step_without_prefetch_is_compute_plus_demand_reads():
    shape = ModelShape(num_layers=4, num_experts=8, top_k=2, expert_bytes=10 * MiB)
    p = predict_decode(shape, _rates(), hit_rate=0.75)
    # 8 requests; 2 demand reads of 10 MiB at 100 MiB/s = 0.2 s; compute 0.010 + 8 * 0.001 = 0.018 s
    assert p.compute_seconds == pytest.approx(0.018)
    assert p.demand_read_seconds == pytest.approx(0.2)
    assert p.step_seconds == pytest.approx(0.218)
    assert p.tokens_per_s == pytest.approx(1 / 0.218)
    assert p.bound == "io" and p.io_bound_tokens_per_s == pytest.approx(5.0)
    assert p.compute_bound_tokens_per_s == pytest.approx(1 / 0.018)
    assert p.bytes_per_token == pytest.approx(20 * MiB)
    # everything resident: compute bound, nothing read
    q = predict_decode(shape, _rates(), hit_rate=1.0)
    assert q.bound == "compute" and q.tokens_per_s == pytest.approx(1 / 0.018) and math.isinf(q.io_bound_tokens_per_s)


def test_overlapped_misses_hide_reads_under_the_layers_resident_experts():
    # L=2 layers, k=2 requests per layer, hit 1/2: n ~ Binomial(2, 1/2) misses per layer;
    # t_e = 1 ms, one read = 3 ms. n=0: 2; n=1: max(1, 3) + 1 = 4; n=2: max(0, 6) + 2 = 8 (ms)
    shape = ModelShape(num_layers=2, num_experts=4, top_k=2, expert_bytes=3 * MiB)
    r = _rates(read_bandwidth=1000 * MiB, dense_seconds=0.010)
    serial = predict_decode(shape, r, hit_rate=0.5)
    over = predict_decode(shape, r, hit_rate=0.5, overlap_misses=True)
    layer = 0.25 * 0.002 + 0.5 * 0.004 + 0.25 * 0.008          # 4.5 ms against 2 + 1 * 3 = 5 ms serial
    assert serial.step_seconds == pytest.approx(0.010 + 2 * 0.005)
    assert over.step_seconds == pytest.approx(0.010 + 2 * layer)
    exposed = 0.5 * (0.003 - 0.001) + 0.25 * 0.006             # reads left on the critical path per layer
    assert over.demand_read_seconds == pytest.approx(2 * exposed)
    assert over.bytes_per_token == serial.bytes_per_token and over.compute_seconds == serial.compute_seconds
    # nothing to read: the same step either way
    assert predict_decode(shape, r, hit_rate=1.0, overlap_misses=True).step_seconds == \
        pytest.approx(predict_decode(shape, r, hit_rate=1.0).step_seconds)


def test_cache_bookkeeping_per_layer_access_is_on_the_critical_path():
    shape = ModelShape(num_layers=4, num_experts=8, top_k=2, expert_bytes=10 * MiB)
    base = predict_decode(shape, _rates(), hit_rate=1.0)
    p = predict_decode(shape, _rates(access_seconds=0.0005), hit_rate=1.0)
    assert p.compute_seconds == pytest.approx(base.compute_seconds + 4 * 0.0005)
    with pytest.raises(ValueError, match="access_seconds"):
        _rates(access_seconds=-1.0)


def test_prefetch_reads_overlap_compute_until_the_link_is_full():
    shape = ModelShape(num_layers=4, num_experts=8, top_k=2, expert_bytes=1 * MiB)
    r = _rates(read_latency=0.001)
    # 1 demand read (0.011 s) + 1 prefetch read (0.011 s) hidden under 0.018 s of compute
    p = predict_decode(shape, r, hit_rate=7 / 8, prefetch_reads=1)
    assert p.demand_read_seconds == pytest.approx(0.011) and p.prefetch_read_seconds == pytest.approx(0.011)
    assert p.step_seconds == pytest.approx(0.018 + 0.011) and p.bound == "compute"
    # 4 prefetch reads (0.044 s) exceed the compute: the link sets the pace
    p = predict_decode(shape, r, hit_rate=7 / 8, prefetch_reads=4)
    assert p.step_seconds == pytest.approx(0.011 + 0.044) and p.bound == "io"
    assert p.bytes_per_token == pytest.approx(5 * MiB)


def test_batch_touches_more_experts_and_dense_scales():
    shape = ModelShape(num_layers=2, num_experts=8, top_k=2, expert_bytes=MiB)
    r = _rates(expert_seconds_per_token=0.0005, dense_batch=1)
    p = predict_decode(shape, r, hit_rate=1.0, batch=2)
    per_layer = 3.5                     # distinct experts for 2 tokens
    tokens_per_expert = 2 * 2 / per_layer
    want = 0.020 + 2 * per_layer * (0.001 + (tokens_per_expert - 1) * 0.0005)
    assert p.compute_seconds == pytest.approx(want) and p.tokens_per_s == pytest.approx(2 / want)


def test_inputs_validated():
    shape = ModelShape(2, 8, 2, MiB)
    with pytest.raises(ValueError, match="hit_rate"):
        predict_decode(shape, _rates(), hit_rate=1.5)
    with pytest.raises(ValueError, match="read_bandwidth"):
        Rates(read_bandwidth=0, dense_seconds=1, expert_seconds=1)
    with pytest.raises(ValueError, match="ModelShape"):
        ModelShape(2, 8, 9, MiB)


def test_miss_decision_copy_vs_compute_where_it_lives():
    # an H200-like link (~50 GB/s pinned) against a host 30x slower than the device per expert
    gpu = _rates(read_bandwidth=50e9, expert_seconds=20e-6, expert_seconds_per_token=1e-6,
                 slow_compute_factor=30.0, h2d_bandwidth=25e9)
    big = 3 * 4096 * 14336 * 2              # a Mixtral expert in bf16: ~352 MB, ~7 ms to copy
    m = MissCostModel(gpu, [big], hidden_size=4096, act_bytes=2)
    copy, slow = m.costs(0, 1)
    assert copy == pytest.approx(big / 50e9 + 20e-6)
    assert slow == pytest.approx(30 * 20e-6 + 2 * 4096 * 2 / 25e9)
    assert m.decide(0, 1, p_reuse=0.0) == "compute_slow"       # one token: 0.6 ms on the host beats 7 ms
    # many tokens: the host's compute grows, the copy does not
    assert m.decide(0, 4096, p_reuse=0.0) == "copy"
    # likely reuse tips a borderline case to copying (the next use is then a hit)
    tokens = 200
    c, s = m.costs(0, tokens)
    assert c > s and m.decide(0, tokens, p_reuse=0.0) == "compute_slow"
    assert m.decide(0, tokens, p_reuse=0.99) == "copy"
    # a small expert is cheap to copy
    assert MissCostModel(gpu, [1 << 16], hidden_size=4096).decide(0, 1) == "copy"
    with pytest.raises(ValueError, match="h2d_bandwidth"):
        MissCostModel(_rates(), [big], hidden_size=4096)


def test_miss_model_refused_on_cpu(tmp_path):
    pytest.importorskip("transformers", minversion="5.0")
    from _offload_models import save_model
    from moekit.offload.runner import load_offloaded

    d = save_model("olmoe", tmp_path / "m", seed=5)
    with pytest.raises(ValueError, match="device='cuda' and tier='ram'"):
        load_offloaded(d, "1GiB", miss_model="auto", progress=False)


def test_calibrate_and_cli_report_prediction(tmp_path, capsys):
    pytest.importorskip("transformers", minversion="5.0")
    from _offload_models import PROMPT, hf_generate, load_reference, save_model
    from moekit.cli import main
    from moekit.offload.runner import load_offloaded

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = save_model("olmoe", tmp_path / "m", seed=6)
        want = hf_generate(load_reference(d), PROMPT, 6)
        with load_offloaded(d, "1GiB", progress=False, prefetch=True) as om:
            before = (om.store.bytes_read, om.cache.stats["prefill"].requests, om.cache.stats["decode"].requests)
            rates = om.calibrate()
            # the probes leave the run's counters and the cache alone
            assert (om.store.bytes_read, om.cache.stats["prefill"].requests,
                    om.cache.stats["decode"].requests) == before
            assert rates.read_bandwidth > 0 and rates.dense_seconds > 0 and rates.expert_seconds > 0
            assert rates.access_seconds > 0               # timed on a scratch cache: the run's is untouched
            r = om.generate(PROMPT, max_new_tokens=6)
            assert r.generated_ids[0] == want
            m = r.metrics
            assert m["predicted_decode_tokens_per_s"] > 0 and m["predicted_bound"] in ("io", "compute")
            # measured and predicted terms of a decode step, side by side
            parts = ("demand_read", "expert_compute", "prefetch_wait", "other")
            assert m["decode_step_seconds"] == pytest.approx(sum(m[f"decode_{k}_seconds"] for k in parts))
            assert m["decode_step_seconds"] == pytest.approx(m["decode_seconds"] / 5)
            assert m["decode_expert_compute_seconds"] > 0 and m["decode_demand_read_seconds"] >= 0
            assert m["predicted_step_seconds"] == pytest.approx(1 / m["predicted_decode_tokens_per_s"])
            assert m["predicted_dense_seconds"] == pytest.approx(rates.dense_seconds)
            assert m["predicted_expert_compute_seconds"] > 0 and m["predicted_demand_read_seconds"] >= 0
        rc = main(["run", "--model", str(d), "--budget", "1GiB", "--prompt-ids", ",".join(map(str, PROMPT)),
                   "--max-new-tokens", "6", "--json", "--prefetch"])
        out = json.loads(capsys.readouterr().out)
        assert rc == 0 and out["generated_ids"] == want and out["prefetch"] is True
        for k in ("predicted_decode_tokens_per_s", "predicted_bound", "predicted_io_bound_tokens_per_s",
                  "decode_tokens_per_s", "prediction_recall"):
            assert k in out
        rc = main(["run", "--model", str(d), "--budget", "1GiB", "--prompt-ids", "5,17", "--max-new-tokens", "3",
                   "--no-prefetch"])
        text = capsys.readouterr().out
        assert rc == 0 and "throughput model: predicted decode tokens/s" in text and "prefetch:" not in text
        assert main(["run", "--model", str(d), "--prompt-ids", "5", "--horizon", "0"]) == 2
        assert main(["run", "--model", str(d), "--prompt-ids", "5", "--miss-model", "auto"]) == 2
    finally:
        torch.set_num_threads(n)
