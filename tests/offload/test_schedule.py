"""Token scheduling (moekit.offload.schedule): invariants, hand cases, the replay of batched
passes, and on the real traces fewer distinct experts per batch than FIFO."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moekit.offload.schedule import batch_accesses, batch_costs, fifo_batches, route_sets, schedule
from moekit.offload.simulate import load_trace, replay_accesses

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
needs_traces = pytest.mark.skipif(not (TRACES / "qwen.route.csv").exists(), reason="../shared/traces is absent")


def _random_sig(R, L=3, E=16, K=2, seed=0):
    """[R, L, E]: each request K..3K experts per layer, drawn from one of three 'topics' (each a
    preferred half of the experts) so that some grouping is better than others."""
    rng = np.random.default_rng(seed)
    sig = np.zeros((R, L, E), dtype=bool)
    for r in range(R):
        topic = rng.integers(3)
        for l in range(L):
            pool = (np.arange(E // 2) + topic * E // 4) % E
            sig[r, l, rng.choice(pool, rng.integers(K, 3 * K + 1), replace=False)] = True
    return sig


@pytest.mark.parametrize("R,B", [(1, 4), (5, 1), (7, 2), (12, 4), (13, 4), (9, 9), (20, 3)])
def test_every_request_once_batch_sizes_deterministic(R, B):
    sig = _random_sig(R, seed=R * 10 + B)
    got = schedule(sig, B)
    flat = sorted(r for b in got for r in b)
    assert flat == list(range(R))                                        # each exactly once
    assert len(got) == -(-R // B)
    assert sorted(map(len, got)) == sorted(map(len, fifo_batches(R, B)))  # full batches but one
    assert all(1 <= len(b) <= B for b in got)
    assert schedule(sig, B) == got                                       # deterministic
    # the same request sets given as lists of expert ids schedule the same way
    as_lists = [[np.flatnonzero(sig[r, l]).tolist() for l in range(sig.shape[1])] for r in range(R)]
    assert schedule(as_lists, B) == got
    assert schedule(list(sig), B) == got
    # never worse than FIFO on the predicted cost; swaps never undo greedy's gains
    assert batch_costs(sig, got).sum() <= batch_costs(sig, fifo_batches(R, B)).sum()
    greedy_only = schedule(sig, B, refine=False)
    assert batch_costs(sig, got).sum() <= batch_costs(sig, greedy_only).sum()


def test_hand_case_finds_the_obvious_grouping():
    # four requests, two routes, arriving interleaved: A B A B. FIFO pairs A with B.
    A = [{0, 1}, {2, 3}]
    B = [{4, 5}, {6, 7}]
    sigs = [A, B, A, B]
    assert fifo_batches(4, 2) == [[0, 1], [2, 3]]
    got = schedule(sigs, 2)
    assert sorted(got) == [[0, 2], [1, 3]]
    assert got[0] == [0, 2]                      # the batch with the oldest request first
    assert batch_costs(sigs, got).tolist() == [4, 4]
    assert batch_costs(sigs, fifo_batches(4, 2)).tolist() == [8, 8]
    # three topics of two requests each, shuffled, batches of two: each topic together
    topic = [[{0, 1}], [{2, 3}], [{4, 5}]]
    order = [2, 0, 1, 1, 2, 0]
    got = schedule([topic[t] for t in order], 2)
    assert sorted(got) == [[0, 4], [1, 5], [2, 3]]
    # near-identical routes beat a small route that shares nothing (fewest new experts, not size)
    sigs = [[{0, 1, 2, 3}], [{9}], [{0, 1, 2, 4}], [{10}]]
    assert sorted(schedule(sigs, 2)) == [[0, 2], [1, 3]]


def test_batch_order_follows_overlap():
    # batches {0,1} (experts 0-1), {2,3} (8-9), {4,5} (0-2): order puts {4,5} right after {0,1}
    sigs = [[{0, 1}], [{0, 1}], [{8, 9}], [{8, 9}], [{0, 1, 2}], [{0, 1, 2}]]
    assert schedule(sigs, 2) == [[0, 1], [4, 5], [2, 3]]
    assert schedule(sigs, 2, order=False) == [[0, 1], [2, 3], [4, 5]]


def test_fifo_method_and_errors():
    sig = _random_sig(6)
    assert schedule(sig, 4, method="fifo") == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="method"):
        schedule(sig, 2, method="lpt")
    with pytest.raises(ValueError, match="batch_size"):
        schedule(sig, 0)
    with pytest.raises(ValueError, match=r"\[R, L, E\]"):
        schedule(np.zeros((3, 4), dtype=bool), 2)
    with pytest.raises(ValueError, match="same number of layers"):
        schedule([[{0}], [{0}, {1}]], 2)


def test_route_sets_union_and_top_n():
    ids_TLK = np.array([[[0, 1], [3, -1]],
                        [[1, 2], [3, 4]],
                        [[1, 0], [5, 3]]])                 # [T=3, L=2, K=2]
    u = route_sets(ids_TLK, 6)
    assert u.shape == (2, 6)
    assert np.flatnonzero(u[0]).tolist() == [0, 1, 2] and np.flatnonzero(u[1]).tolist() == [3, 4, 5]
    top = route_sets(ids_TLK, 6, top_n=2)                  # counts: l0 {1:3, 0:2, 2:1}; l1 {3:3, 4:1, 5:1}
    assert np.flatnonzero(top[0]).tolist() == [0, 1] and np.flatnonzero(top[1]).tolist() == [3, 4]
    with pytest.raises(ValueError, match="outside"):
        route_sets(ids_TLK, 4)


def test_batch_accesses_and_replay():
    # two requests, 2 layers, top-1: request 0 always expert 0/1, request 1 expert 2/3
    p0 = np.array([[[0], [1]]] * 3)                        # [T=3, L=2, K=1]
    p1 = np.array([[[2], [3]]] * 3)
    work = [("prefill", [(0, 0), (1, 0)]), ("decode", [(0, 1), (1, 1)]), ("decode", [(0, 2)])]
    acc = batch_accesses([p0, p1], work)
    assert [(a.phase, a.layer, a.experts, a.token) for a in acc] == [
        ("prefill", 0, (0, 2), 0), ("prefill", 1, (1, 3), 0),
        ("decode", 0, (0, 2), 1), ("decode", 1, (1, 3), 1),
        ("decode", 0, (0,), 2), ("decode", 1, (1,), 2)]
    # room for both experts of each layer: every decode request hits; one slot per layer: streamed
    big = replay_accesses(acc, 4 * 10, [10, 10], 4, 1, "lru", decode_tokens=3)
    assert big.hit_rate_prefill == 0.0 and big.hit_rate_decode == 1.0
    assert big.bytes_per_decode_token == 0.0 and big.decode_tokens == 3
    small = replay_accesses(acc, 2 * 10, [10, 10], 4, 1, "lru", decode_tokens=3)
    assert small.hit_rate_decode < 1.0 and small.bytes_per_decode_token > 0
    for policy in ("predictive", "lfu", "static", "belady"):
        r = replay_accesses(acc, 3 * 10, [10, 10], 4, 1, policy, decode_tokens=3)
        assert 0.0 <= r.hit_rate_decode <= 1.0
    with pytest.raises(ValueError, match="phase"):
        batch_accesses([p0], [("warmup", [(0, 0)])])


def _step_distinct(reqs, E, B, mode):
    """Mean distinct experts per (decode pass, layer) when every request decodes one token per step
    in batches of B: FIFO batches, or batches scheduled on each request's previous token's routes."""
    total = n = 0
    for t in range(1, reqs[0].shape[0]):
        if mode == "fifo":
            bs = fifo_batches(len(reqs), B)
        else:
            bs = schedule([route_sets(r[t - 1:t], E) for r in reqs], B)
        for b in bs:
            total += route_sets(np.stack([reqs[i][t] for i in b]), E).sum()
            n += reqs[0].shape[1]
    return total / n


@needs_traces
@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_real_traces_fewer_distinct_experts_than_fifo(name):
    tr = load_trace(TRACES / f"{name}.route.csv")
    ids_TLK = np.stack(tr.topk_ids).transpose(1, 0, 2)
    S, B = 12, 4
    R = ids_TLK.shape[0] // S
    fifo, sched = [], []
    for seed in range(3):                      # arrival orders
        perm = np.random.default_rng(seed).permutation(R)
        reqs = [ids_TLK[r * S:(r + 1) * S] for r in perm]
        fifo.append(_step_distinct(reqs, tr.num_experts, B, "fifo"))
        sched.append(_step_distinct(reqs, tr.num_experts, B, "sched"))
    # measured: qwen 14.4 -> 13.8, gemma 14.8 -> 14.2 (B x K = 24 at most); every seed improves
    assert all(s < f for s, f in zip(sched, fifo)), (fifo, sched)
    assert np.mean(sched) < 0.98 * np.mean(fifo), (fifo, sched)
