"""Metrics against hand-computed small cases; loads, transitions, placement maps."""
from __future__ import annotations

import numpy as np
import pytest

from moekit.planner import (CostModel, Placement, RoutingTrace, Topology, evaluate, expert_loads, gpu_traffic,
                            migration_cost, transitions)


@pytest.fixture
def toy():
    # 4 tokens, top-1, 4 experts, 2 layers
    ids = [np.array([[0], [0], [1], [2]]), np.array([[1], [3], [1], [2]])]
    return RoutingTrace(ids, None, 4, {"expert_bytes": [10, 20]})


def test_loads_and_transitions(toy):
    assert expert_loads(toy).tolist() == [[2, 1, 1, 0], [0, 2, 1, 1]]
    R = transitions(toy)
    assert R.shape == (1, 4, 4)
    want = np.zeros((4, 4))
    want[0, 1] = want[0, 3] = want[1, 1] = want[2, 2] = 1
    assert np.array_equal(R[0], want)


def test_transitions_topk_pairs_and_empty():
    tr = RoutingTrace([np.array([[0, 1], [2, -1]]), np.array([[2, 3], [0, 1]])], None, 4)
    R = transitions(tr)[0]
    # token 0: {0,1} x {2,3} = 4 pairs; token 1: {2} x {0,1} = 2 pairs (the -1 slot is ignored)
    assert R.sum() == 6 and R[0, 2] == R[0, 3] == R[1, 2] == R[1, 3] == R[2, 0] == R[2, 1] == 1


def test_evaluate_hand_case(toy):
    pl = Placement(np.array([[0, 1, 2, 3], [0, 1, 2, 3]]), 2, 2, 4).validate()
    m = evaluate(pl, toy, batch_size=2)
    # layer 0: GPU loads (3, 1); layer 1: (2, 2) -> (3 + 2) / (2 + 2)
    assert m["max_mean_load"] == pytest.approx(1.25)
    assert m["max_mean_load_worst_layer"] == pytest.approx(1.5)
    # pairs 0->1 same GPU, 0->3 cross, 1->1 same, 2->2 same
    assert m["cross_gpu_frac"] == pytest.approx(0.25)
    assert m["worst_link_frac"] == pytest.approx(0.25)
    assert m["cross_node_frac"] == 0.0
    # batches of 2 tokens: (2 + 1) / (1 + 1) = 1.5 and (1 + 1) / (1 + 1) = 1.0
    assert m["num_batches"] == 2
    assert m["batch_max_mean_p50"] == pytest.approx(1.25)
    assert m["batch_max_mean_p99"] == pytest.approx(1.0 + 0.5 * 0.99)
    assert m["memory_per_gpu_slots"] == 4 and m["memory_per_gpu_bytes"] == 2 * 30
    # compute part of the modeled latency: heaviest GPU tokens x 1e-3 us, averaged over layers
    assert m["compute_us_per_layer"] == pytest.approx((3 + 2) / 2 * 1e-3)


def test_cross_node(toy):
    pl = Placement(np.array([[0, 1, 2, 3], [0, 1, 2, 3]]), 4, 1, 4)
    m = evaluate(pl, toy, Topology(4, 1, gpus_per_node=2))
    # pairs 0->1 (GPU0->GPU1, same node), 0->3 (GPU0->GPU3, cross node), 1->1, 2->2 (same GPU)
    assert m["cross_gpu_frac"] == pytest.approx(0.5)
    assert m["cross_node_frac"] == pytest.approx(0.25)


def test_replica_shares(toy):
    # 2 GPUs x 3 slots: experts 0 and 2 replicated in layer 0
    pl = Placement(np.array([[0, 1, 2, 0, 3, 2], [1, 0, 2, 1, 3, 2]]), 2, 3, 4).validate()
    loads = expert_loads(toy)
    sl = pl.slot_loads(loads)
    for l in range(2):
        per = np.zeros(4)
        np.add.at(per, pl.phy2log[l], sl[l])
        assert np.allclose(per, loads[l])   # replicas' shares sum to the expert's load
    assert pl.gpu_loads(loads)[0].tolist() == [2.5, 1.5]
    assert pl.logcnt[0].tolist() == [2, 1, 2, 1]
    assert pl.log2phy[0, 0].tolist() == [0, 3]
    M = pl.share_matrix(0)
    assert np.allclose(M.sum(1), 1) and M[0].tolist() == [0.5, 0.5]
    T = gpu_traffic(pl, transitions(toy))
    assert T.sum() == pytest.approx(4)


def test_migration():
    old = Placement(np.array([[0, 1, 2, 3], [0, 1, 2, 3]]), 2, 2, 4)
    new = Placement(np.array([[1, 0, 2, 3], [2, 1, 0, 3]]), 2, 2, 4)
    m = migration_cost(old, new, expert_bytes=[10, 20])
    assert m["migration_experts"] == 2 and m["migration_bytes"] == 40 and m["migration_bytes_max_gpu"] == 20


def test_placement_validation():
    from moekit.planner import PlacementError
    with pytest.raises(PlacementError, match="expert 3 has no slot"):
        Placement(np.array([[0, 1, 2, 2]]), 2, 2, 4).validate()
    with pytest.raises(PlacementError, match="slots"):
        Placement(np.array([[0, 1, 2]]), 2, 2, 4).validate()


def test_json_roundtrip(tmp_path):
    import json
    from moekit.planner import load_placement
    pl = Placement(np.array([[0, 1, 2, 0, 3, 2]]), 2, 3, 4)
    d = pl.to_json_dict(eplb=True)
    assert d["logcnt"] == [[2, 1, 2, 1]] and d["log2phy"][0][1] == [1, -1]
    (tmp_path / "p.json").write_text(json.dumps(d))
    back = load_placement(tmp_path / "p.json")
    assert np.array_equal(back.phy2log, pl.phy2log) and back.slots_per_gpu == 3


@pytest.fixture
def three_layers():
    """4 tokens, top-1, 4 experts, 3 layers; a different placement in every layer, so a formula
    that reads layer l's placement where it needs layer l+1's (or layer 0's everywhere) is caught.
    GPU of each expert (2 GPUs x 2 slots):
      layer 0 [0 1 | 2 3]: e0 e1 on GPU 0;  layer 1 [1 2 | 0 3]: e1 e2 on GPU 0;  layer 2 [2 3 | 0 1]: e2 e3 on GPU 0."""
    ids = [np.array([[0], [0], [1], [2]]), np.array([[1], [3], [1], [2]]), np.array([[3], [3], [0], [1]])]
    pl = Placement(np.array([[0, 1, 2, 3], [1, 2, 0, 3], [2, 3, 0, 1]]), 2, 2, 4).validate()
    return RoutingTrace(ids, None, 4), pl


def test_evaluate_different_placement_per_layer(three_layers):
    tr, pl = three_layers
    # loads: l0 e0=2 e1=1 e2=1; l1 e1=2 e2=1 e3=1; l2 e3=2 e0=1 e1=1
    assert pl.gpu_loads(expert_loads(tr)).tolist() == [[3, 1], [3, 1], [2, 2]]
    # boundary 0 pairs (token: e@l0 -> e@l1): 0->1 GPU0->GPU0, 0->3 GPU0->GPU1, 1->1 GPU0->GPU0, 2->2 GPU1->GPU0
    # boundary 1 pairs: 1->3 GPU0->GPU0, 3->3 GPU1->GPU0, 1->0 GPU0->GPU1, 2->1 GPU0->GPU1
    T = gpu_traffic(pl, transitions(tr))
    assert T.tolist() == [[[2, 1], [1, 0]], [[1, 2], [1, 0]]]
    m = evaluate(pl, tr, batch_size=2)
    assert m["max_mean_load"] == pytest.approx((3 + 3 + 2) / 6)
    assert m["max_mean_load_worst_layer"] == pytest.approx(1.5)
    assert m["cross_gpu_frac"] == pytest.approx(5 / 8) and m["cross_gpu_pairs"] == 5
    assert m["worst_link_frac"] == pytest.approx(2 / 4)          # boundary 1, GPU0 -> GPU1
    # batches of tokens {0, 1} and {2, 3}: per layer heaviest GPU (2, 1, 2) and (1, 2, 2), mean 1 each
    assert m["num_batches"] == 2 and m["batch_max_mean_p50"] == pytest.approx(5 / 3)
    # the slowest link per boundary carries 1 and 2 tokens (top-1: a pair is a token); none after the last
    us_per_token = CostModel().token_bytes / 450e9 * 1e6
    assert m["comm_us_per_layer"] == pytest.approx((1 + 2 + 0) / 3 * us_per_token)
    assert m["compute_us_per_layer"] == pytest.approx((3 + 3 + 2) / 3 * 1e-3)


def test_weighted_traffic_reads_both_ends_of_a_boundary(three_layers):
    """The ILP's traffic objective (it accepts the exact DP / matching plans and picks the slack
    sweep's best) on the hand case: with layer l's placement at both ends it would give 1*1 + 2*1 = 3."""
    from moekit.planner.ilp import weighted_traffic
    tr, pl = three_layers
    A = [pl.phy2log[l].reshape(2, 2) for l in range(3)]
    W = np.array([[0.0, 1.0], [3.0, 0.0]])                      # GPU1 -> GPU0 costs 3x: direction counts
    # boundary 0: GPU0->GPU1 1 pair, GPU1->GPU0 1 pair; boundary 1: GPU0->GPU1 2, GPU1->GPU0 1
    assert weighted_traffic(A, transitions(tr), W, 4) == pytest.approx((1 + 3) + (2 + 3))
