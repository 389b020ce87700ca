"""Greedy and ILP planners: valid placements, ILP never worse than its greedy warm start, bounds valid."""
from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest

from moekit import planner as P
from moekit.planner.assign import bottleneck_assignment, linear_assignment
from moekit.planner.ilp import balance_layer, dp_traffic, layer_bounds, local_search, weighted_traffic


def _valid(pl: P.Placement, loads):
    pl.validate()
    G, S = pl.num_gpus, pl.slots_per_gpu
    for l in range(pl.num_layers):
        per_gpu = pl.phy2log[l].reshape(G, S)
        for g in range(G):
            assert len(set(per_gpu[g].tolist())) == S, "an expert twice on one GPU"
        sl = pl.slot_loads(loads)[l]
        per = np.zeros(pl.num_experts)
        np.add.at(per, pl.phy2log[l], sl)
        assert np.allclose(per, loads[l])


def test_replica_counts():
    assert P.replica_counts(np.array([10.0, 4, 1]), 5, 3).tolist() == [3, 1, 1]
    assert P.replica_counts(np.array([10.0, 4, 1]), 5, 2).tolist() == [2, 2, 1]
    with pytest.raises(ValueError):
        P.replica_counts(np.array([1.0, 1]), 1, 2)


@pytest.mark.parametrize("E,G,S", [(8, 4, 2), (8, 4, 3), (16, 4, 5), (12, 3, 4), (10, 5, 2)])
def test_all_planners_valid(E, G, S):
    rng = np.random.default_rng(E * 100 + G * 10 + S)
    loads = rng.lognormal(0, 1, (3, E)).round(2)
    topo = P.Topology(G, S)
    for pl in (P.contiguous_placement(E, 3, topo), P.round_robin_placement(E, 3, topo),
               P.greedy_placement(loads, topo), P.greedy_placement(loads, P.Topology(G, S, 1), hierarchical=True),
               P.ilp_placement(loads, topo, time_limit=2, n_jobs=1)[0]):
        _valid(pl, loads)


def test_capacity_errors():
    with pytest.raises(ValueError, match="need slots_per_gpu >= 3"):
        P.greedy_placement(np.ones((1, 8)), P.Topology(3, 2))
    with pytest.raises(ValueError, match="exceeds the number of experts"):
        P.greedy_placement(np.ones((1, 4)), P.Topology(2, 5))
    with pytest.raises(ValueError, match="do not divide evenly over 3 GPUs; pass slots_per_gpu >= 3"):
        P.make_topology(8, 3)
    with pytest.raises(ValueError, match="gpus_per_node=3 must divide"):
        P.make_topology(8, 4, gpus_per_node=3)
    with pytest.raises(ValueError, match="num_gpus is required unless the topology is read from this machine"):
        P.make_topology(8)
    with pytest.raises(ValueError, match="unknown solver 'simplex'"):
        P.plan_placement(np.ones((1, 8)), 4, solver="simplex")


def test_input_errors_render_each_front_ends_names():
    """One message, its fields named by whoever shows it: Python names by default, CLI flags in `moekit plan`."""
    with pytest.raises(P.PlanInputError) as ei:
        P.make_topology(8, 4, gpus_per_node=3)
    assert ei.value.fields == ["gpus_per_node", "num_gpus"]
    assert str(ei.value) == "gpus_per_node=3 must divide num_gpus=4"
    assert ei.value.render({"gpus_per_node": "--gpus-per-node", "num_gpus": "--gpus"}) == \
        "--gpus-per-node=3 must divide --gpus=4"


@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_ilp_never_worse_than_greedy(solver):
    if solver not in P.available_solvers():
        pytest.skip(f"{solver} not available")
    rng = np.random.default_rng(7)
    E, G, S = 16, 4, 5
    loads = rng.lognormal(0, 1.2, (3, E))
    topo = P.Topology(G, S)
    greedy = P.greedy_placement(loads, topo)
    ilp, info = P.ilp_placement(loads, topo, solver=solver, time_limit=4, n_jobs=1)
    _valid(ilp, loads)
    g_max = greedy.gpu_loads(loads).max(1)
    i_max = ilp.gpu_loads(loads).max(1)
    assert np.all(i_max <= g_max + 1e-9)
    assert info.bound_max_mean <= i_max.sum() / (loads.sum() / G) + 1e-9


def test_ilp_with_traffic_never_worse_in_load():
    rng = np.random.default_rng(3)
    L, E, G = 4, 8, 4
    ids = [np.stack([rng.choice(E, 2, replace=False, p=rng.dirichlet(np.ones(E))) for _ in range(300)])
           for _ in range(L)]
    tr = P.RoutingTrace(ids, None, E)
    st = P.trace_stats(tr)
    topo = P.Topology(G, 2)
    g = P.greedy_placement(st.loads, topo)
    pl, info = P.ilp_placement(st.loads, topo, st.trans, time_limit=4, n_jobs=1)
    _valid(pl, st.loads)
    assert np.all(pl.gpu_loads(st.loads).max(1) <= g.gpu_loads(st.loads).max(1) + 1e-9)
    assert P.evaluate(pl, tr)["cross_gpu_frac"] <= P.evaluate(g, tr)["cross_gpu_frac"] + 1e-12


def _brute_max(load, G, S):
    E = load.size
    best = np.inf
    for perm in itertools.permutations(range(E)):
        A = np.array(perm).reshape(G, S)
        best = min(best, load[A].sum(1).max())
    return best


@pytest.mark.parametrize("seed", range(4))
def test_balance_exact_and_bound_valid(seed):
    rng = np.random.default_rng(seed)
    E, G, S = 6, 3, 2
    load = rng.integers(0, 20, E).astype(float)
    opt = _brute_max(load, G, S)
    glob, given = layer_bounds(load, G, S)
    assert glob <= opt + 1e-9 and given <= opt + 1e-9
    r = balance_layer(load, G, S, "highs", time_limit=5)
    assert r.max_load == pytest.approx(opt)
    assert r.bound <= opt + 1e-9 and r.max_load <= r.greedy_max + 1e-9


def test_bounds_with_replication_valid():
    rng = np.random.default_rng(11)
    load = rng.lognormal(0, 1, 6)
    G, S = 2, 4   # 8 slots for 6 experts
    glob, given = layer_bounds(load, G, S)
    # brute force over replica counts (each <= G) and assignments
    best = np.inf
    for cnt in itertools.product(range(1, G + 1), repeat=6):
        if sum(cnt) != G * S:
            continue
        cnt = np.array(cnt)
        experts = np.repeat(np.arange(6), cnt)
        w = (load / cnt)[experts]
        for mask in itertools.combinations(range(8), S):
            g0 = list(mask)
            g1 = [i for i in range(8) if i not in mask]
            if len(set(experts[g0])) < S or len(set(experts[g1])) < S:
                continue
            best = min(best, max(w[g0].sum(), w[g1].sum()))
    assert glob <= best + 1e-9


def test_local_search_improves():
    rng = np.random.default_rng(5)
    w = rng.lognormal(0, 1, 40)
    A = np.arange(40).reshape(8, 5)
    B = local_search(w, A)
    assert sorted(B.ravel().tolist()) == list(range(40))
    assert w[B].sum(1).max() <= w[A].sum(1).max()


def test_assignment_solvers_exact():
    rng = np.random.default_rng(0)
    for n in (1, 3, 5):
        C = rng.integers(0, 9, (n, n)).astype(float)
        col = linear_assignment(C)
        perms = list(itertools.permutations(range(n)))
        assert C[np.arange(n), col].sum() == min(sum(C[i, p[i]] for i in range(n)) for p in perms)
        _, b = bottleneck_assignment(C)
        assert b == min(max(C[i, p[i]] for i in range(n)) for p in perms)


def test_dp_traffic_exact():
    rng = np.random.default_rng(2)
    L, E, G, S = 3, 4, 2, 2
    loads = np.ones((L, E))
    trans = rng.integers(0, 5, (L - 1, E, E)).astype(float)
    W = 1 - np.eye(G)
    A, _ = dp_traffic(loads, [np.inf] * L, trans, W, G, S)
    states = [np.array(p).reshape(G, S) for p in itertools.permutations(range(E))]
    best = min(weighted_traffic(list(c), trans, W, E) for c in itertools.product(states, repeat=L))
    assert weighted_traffic(A, trans, W, E) == pytest.approx(best)


def test_planner_does_not_import_torch():
    import subprocess
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    code = ("import sys, importlib.util as u; s = u.spec_from_file_location('planner', "
            f"r'{repo / 'planner' / '__init__.py'}', submodule_search_locations=[r'{repo / 'planner'}']); "
            "m = u.module_from_spec(s); sys.modules['planner'] = m; s.loader.exec_module(m); "
            "import planner.api, planner.ilp, planner.plot; "
            "assert 'torch' not in sys.modules, 'planner imported torch'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_ilp_on_qwen_subset(shared_traces):
    tr = P.read_trace(shared_traces / "qwen.route.csv").layers(range(6))
    g = P.plan_placement(tr, 16, 10, solver="greedy")
    i = P.plan_placement(tr, 16, 10, solver="highs", time_limit=4, n_jobs=2)
    _valid(i.placement, P.expert_loads(tr))
    assert i.max_mean_load <= g.max_mean_load + 1e-12
    assert 1.0 <= i.lower_bound <= i.max_mean_load and i.gap >= 0
    assert i.metrics["cross_gpu_frac"] <= g.metrics["cross_gpu_frac"] + 1e-12
    # the JSON the runtime reads
    d = i.to_json_dict(eplb=True)
    assert len(d["physical_to_logical_map"]) == 6 and len(d["physical_to_logical_map"][0]) == 160
    assert sum(d["logcnt"][0]) == 160
