"""ExpertCache invariants: hard budget, quotas, eviction order per policy, Belady optimal, errors."""
from __future__ import annotations

import random

import numpy as np
import pytest

from moekit.offload import ExpertCache
from moekit.offload.cache import split_quotas


def test_min_budget_refused_with_minimum_stated():
    assert ExpertCache.min_budget([100, 200], 2) == 600
    with pytest.raises(ValueError, match=r"minimum is 600 bytes \(0\.0 MiB\)"):
        ExpertCache(599, [100, 200], 8, 2)
    ExpertCache(600, [100, 200], 8, 2)                      # exactly one token's working set


@pytest.mark.parametrize("policy", ["lru", "lfu", "static", "predictive"])
def test_streamed_access_leaves_the_scratch_slot_free(policy):
    """More experts than the quota (a batch's tokens) after other experts were kept: residents the
    access does not use go, so that kept + one streamed expert at a time fit the quota (found by
    batched generation at the minimum budget, where the held weights went one expert over)."""
    c = ExpertCache(2 * 10, [10], 8, 2, policy=policy, profile=np.ones((1, 8)))
    c.access(0, [0, 1])
    assert c.resident(0) == ({0} if policy == "static" else {0, 1})   # static pins quota - 1
    r = c.access(0, [2, 3, 4])
    assert len(c.resident(0)) <= c.quotas[0] - 1          # one slot free for the streamed ones
    assert set(r.misses) | set(r.streamed) == {2, 3, 4}
    held = len(c.resident(0)) + 1                          # kept + the streamed expert in flight
    assert held * 10 <= c.budget_bytes
    r = c.access(0, [0, 2, 5])                             # a hit among them is kept or streamed, never lost
    assert set(r.hits) | set(r.misses) | set(r.streamed) == {0, 2, 5}
    assert len(c.resident(0)) <= c.quotas[0] - 1


@pytest.mark.parametrize("policy", ["lru", "lfu", "static", "predictive"])
def test_budget_and_quotas_never_exceeded(policy):
    rng = random.Random(0)
    eb = [100, 150, 80]
    prof = np.random.default_rng(0).integers(0, 9, size=(3, 16))
    c = ExpertCache(1500, eb, 16, 3, policy=policy, profile=prof)
    assert sum(q * b for q, b in zip(c.quotas, eb)) <= 1500
    for step in range(400):
        l = step % 3
        need = rng.sample(range(16), rng.choice([1, 3, 3, 7]))   # 7 > some quotas: streaming
        r = c.access(l, need)
        assert set(r.hits) | set(r.misses) | set(r.streamed) == set(need)
        assert not {e for _, e in r.evicted} & set(need) or all(ll != l for ll, _ in r.evicted)
        assert all(e not in need for ll, e in r.evicted if ll == l)
        assert set(r.hits) | set(r.misses) <= c.resident(l)
        if step % 5 == 0:
            c.prefetch((l + 1) % 3, rng.sample(range(16), 4))
        assert c.bytes_used <= 1500
        assert all(len(c.resident(x)) <= q for x, q in enumerate(c.quotas))
        assert c.bytes_used == sum(len(c.resident(x)) * b for x, b in enumerate(eb))


def test_quota_split_even_then_by_need():
    assert split_quotas(10 * 100, [100, 100], 8, 2) == [5, 5]
    q = split_quotas(10 * 100, [100, 100], 8, 2, need=[3.0, 1.0])
    assert q[0] > q[1] and sum(q) == 10


def test_lru_evicts_least_recent():
    c = ExpertCache(3 * 10, [10], 8, 1, policy="lru")
    for e in (1, 2, 3, 1):
        c.access(0, [e])
    assert c.access(0, [4]).evicted == [(0, 2)]


def test_lfu_evicts_least_frequent():
    c = ExpertCache(3 * 10, [10], 8, 1, policy="lfu")
    for e in (1, 1, 2, 2, 3, 1, 2):
        c.access(0, [e])
    assert c.access(0, [4]).evicted == [(0, 3)]


def test_static_pins_profile_hot_set_and_streams_the_rest():
    prof = np.array([[0, 9, 8, 0, 1, 0, 0, 0]])
    c = ExpertCache(3 * 10, [10], 8, 1, policy="static", profile=prof)  # 2 pinned + the streaming slot
    r = c.access(0, [4])
    assert r.streamed == [4] and c.resident(0) == set()
    c.access(0, [1]); c.access(0, [2])
    assert c.access(0, [4]).streamed == [4] and c.resident(0) == {1, 2}
    assert c.bytes_used + 10 <= 30  # the streamed expert fits beside the pinned ones
    c2 = ExpertCache(2 * 10, [10], 8, 1, policy="static")  # no profile: the first seen, 1 pinned
    c2.access(0, [5]); c2.access(0, [6])
    assert c2.resident(0) == {5} and c2.access(0, [6]).streamed == [6]


def test_predictive_keeps_predicted_and_prefetch_protects_access_in_flight():
    c = ExpertCache(3 * 10, [10], 8, 1, policy="predictive")
    for e in (1, 2, 3):
        c.access(0, [e])
    c.observe_prediction(0, [1])                     # 1 is oldest but predicted
    assert c.access(0, [4]).evicted[0][1] != 1
    c2 = ExpertCache(2 * 10, [10], 8, 2, policy="lru")
    c2.access(0, [1, 2])
    r = c2.prefetch(0, [5, 6])                        # both slots hold the access in flight
    assert r.misses == [] and c2.resident(0) == {1, 2}


def _min_misses(seq, slots):
    """Brute force: fewest misses over every eviction/bypass choice (one layer, unit sizes)."""
    best = [float("inf")]

    def go(i, res, miss):
        if miss >= best[0]:
            return
        if i == len(seq):
            best[0] = miss
            return
        e = seq[i]
        if e in res:
            return go(i + 1, res, miss)
        go(i + 1, res, miss + 1)                      # bypass
        if len(res) < slots:
            go(i + 1, res | {e}, miss + 1)
        else:
            for v in res:
                go(i + 1, (res - {v}) | {e}, miss + 1)

    go(0, frozenset(), 0)
    return best[0]


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_optimal_on_small_cases(seed):
    rng = random.Random(seed)
    seq = [rng.randrange(5) for _ in range(11)]
    slots = rng.choice([1, 2, 3])
    c = ExpertCache(slots * 7, [7], 5, 1, policy="belady", future=[[(e,) for e in seq]])
    for e in seq:
        c.access(0, [e])
    st = c.stats["decode"]
    assert st.misses + st.streamed == _min_misses(seq, slots)
    lru = ExpertCache(slots * 7, [7], 5, 1, policy="lru")
    for e in seq:
        lru.access(0, [e])
    assert lru.stats["decode"].misses >= st.misses + st.streamed


def test_bad_inputs():
    with pytest.raises(ValueError, match="policy"):
        ExpertCache(100, [10], 4, 1, policy="fifo")
    with pytest.raises(ValueError, match="future"):
        ExpertCache(100, [10], 4, 1, policy="belady")
    c = ExpertCache(100, [10], 4, 1)
    with pytest.raises(ValueError, match="expert 9"):
        c.access(0, [9])
    with pytest.raises(ValueError, match="layer 3"):
        c.access(3, [0])
