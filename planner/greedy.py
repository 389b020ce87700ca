"""Baselines: contiguous (Megatron), round-robin, and the EPLB-style greedy.

Legend: L layers, E experts, G GPUs, S slots per GPU, N = G*S physical slots.

Greedy (DeepSeek EPLB's idea, re-implemented): give each redundant slot to the expert with
the highest load per replica, then pack replicas heaviest-first onto the lightest GPU that
still has a free slot and does not already hold that expert. The hierarchical variant packs
replicas onto nodes first, then onto the GPUs of each node.
"""
from __future__ import annotations

import heapq

import numpy as np

from .errors import PlanInputError
from .placement import Placement
from .topology import Topology

__all__ = ["replica_counts", "balanced_packing", "greedy_placement", "contiguous_placement",
           "round_robin_placement", "check_capacity"]


def check_capacity(num_experts: int, topo: Topology) -> None:
    """Raise ValueError when the slots cannot hold every expert (or a GPU would need duplicates)."""
    E, G, S = num_experts, topo.num_gpus, topo.slots_per_gpu
    if G * S < E:
        raise PlanInputError("too few slots: {0} GPUs x {1} slots = {2} < {3} experts; need {slots_per_gpu} >= {4}",
                             G, S, G * S, E, -(-E // G))
    if S > E:
        raise PlanInputError("{slots_per_gpu}={0} exceeds the number of experts {1}: a GPU would hold the same "
                             "expert twice (infeasible); use at most {1}", S, E)


def replica_counts(load_E: np.ndarray, num_slots: int, max_count: int) -> np.ndarray:
    """Water-filling: each of the num_slots - E redundant slots goes to the expert with the
    highest load per replica (at most max_count replicas each). This minimises max_e load/count."""
    load_E = np.asarray(load_E, dtype=np.float64)
    E = load_E.size
    cnt = np.ones(E, dtype=np.int64)
    extra = num_slots - E
    if extra < 0:
        raise ValueError(f"{num_slots} slots < {E} experts")
    if extra > E * (max_count - 1):
        raise ValueError(f"{num_slots} slots need more than {max_count} replicas of some expert")
    heap = [(-load_E[e], e) for e in range(E)]
    heapq.heapify(heap)
    for _ in range(extra):
        while True:
            _, e = heapq.heappop(heap)
            if cnt[e] < max_count:
                break
        cnt[e] += 1
        if cnt[e] < max_count:
            heapq.heappush(heap, (-load_E[e] / cnt[e], e))
    return cnt


def items_of(load_E: np.ndarray, cnt: np.ndarray):
    """Replica items: (expert id [N], weight [N]) with weight = load / count."""
    experts = np.repeat(np.arange(cnt.size), cnt)
    weights = (np.asarray(load_E, float) / cnt)[experts]
    return experts, weights


def balanced_packing(weights: np.ndarray, experts: np.ndarray, num_bins: int, capacity: int,
                     bin_experts: np.ndarray | None = None) -> np.ndarray:
    """Heaviest-first onto the lightest bin with room and without that expert; returns bin per item.

    ``bin_experts`` [bins, E] optionally caps how many replicas of an expert a bin may hold
    (default 1)."""
    n = weights.size
    if n > num_bins * capacity:
        raise ValueError(f"{n} items do not fit {num_bins} bins x {capacity}")
    E = int(experts.max()) + 1 if n else 0
    cap_e = np.ones((num_bins, E), dtype=np.int64) if bin_experts is None else bin_experts.copy()
    load = np.zeros(num_bins)
    fill = np.zeros(num_bins, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    order = np.lexsort((experts, -weights))
    for i in order:
        e = experts[i]
        ok = (fill < capacity) & (cap_e[:, e] > 0)
        if not ok.any():
            ok = fill < capacity  # cannot avoid a duplicate (only in degenerate inputs)
        cand = np.where(ok, load, np.inf)
        b = int(np.argmin(cand))
        out[i] = b
        load[b] += weights[i]
        fill[b] += 1
        cap_e[b, e] -= 1
    return out


def _layer_greedy(load_E: np.ndarray, topo: Topology, hierarchical: bool) -> np.ndarray:
    E, G, S = load_E.size, topo.num_gpus, topo.slots_per_gpu
    cnt = replica_counts(load_E, G * S, G)
    experts, weights = items_of(load_E, cnt)
    if hierarchical and topo.num_nodes > 1:
        N = topo.gpus_per_node
        node = balanced_packing(weights, experts, topo.num_nodes, N * S,
                                bin_experts=np.full((topo.num_nodes, E), N, dtype=np.int64))
        gpu = np.empty_like(node)
        for n in range(topo.num_nodes):
            idx = np.nonzero(node == n)[0]
            gpu[idx] = n * N + balanced_packing(weights[idx], experts[idx], N, S)
    else:
        gpu = balanced_packing(weights, experts, G, S)
    return slots_from_gpus(experts, weights, gpu, G, S)


def slots_from_gpus(experts: np.ndarray, weights: np.ndarray, gpu: np.ndarray, G: int, S: int) -> np.ndarray:
    """phy2log row [G*S] from an item->GPU assignment (within a GPU: heaviest first)."""
    row = np.empty(G * S, dtype=np.int64)
    order = np.lexsort((experts, -weights, gpu))
    g_sorted = gpu[order]
    counts = np.bincount(g_sorted, minlength=G)
    if np.any(counts != S):
        raise AssertionError(f"GPU slot counts {counts.tolist()} != {S}")
    row[:] = experts[order]
    return row


def greedy_placement(loads_LE: np.ndarray, topo: Topology, hierarchical: bool | None = None) -> Placement:
    """EPLB-style greedy per layer. hierarchical=None: node-first when the topology has >1 node."""
    loads_LE = np.atleast_2d(np.asarray(loads_LE, dtype=np.float64))
    L, E = loads_LE.shape
    check_capacity(E, topo)
    if hierarchical is None:
        hierarchical = topo.num_nodes > 1
    rows = [_layer_greedy(loads_LE[l], topo, hierarchical) for l in range(L)]
    return Placement(np.stack(rows), topo.num_gpus, topo.slots_per_gpu, E,
                     meta={"method": "greedy-hierarchical" if hierarchical and topo.num_nodes > 1 else "greedy"})


def _fill_pattern(E: int, N: int) -> np.ndarray:
    """Physical slot order for the contiguous baseline: experts 0..E-1, then extra replicas 0, 1, ..."""
    return np.arange(N) % E


def contiguous_placement(num_experts: int, num_layers: int, topo: Topology) -> Placement:
    """Megatron's default: GPU g holds experts g*S .. g*S+S-1 (extra slots repeat experts 0, 1, ...)."""
    check_capacity(num_experts, topo)
    N = topo.num_slots
    row = _fill_pattern(num_experts, N)
    # avoid a duplicate expert on one GPU when N > E by rotating the repeated part
    row = _dedupe(row, topo.num_gpus, topo.slots_per_gpu, num_experts)
    return Placement(np.tile(row, (num_layers, 1)), topo.num_gpus, topo.slots_per_gpu, num_experts,
                     meta={"method": "contiguous"})


def round_robin_placement(num_experts: int, num_layers: int, topo: Topology) -> Placement:
    """Expert e on GPU e % G (slot e // G); extra slots repeat experts 0, 1, ... the same way."""
    check_capacity(num_experts, topo)
    G, S = topo.num_gpus, topo.slots_per_gpu
    row = np.empty(G * S, dtype=np.int64)
    seq = np.arange(G * S) % num_experts
    for i, e in enumerate(seq):
        g, s = i % G, i // G
        row[g * S + s] = e
    row = _dedupe(row, G, S, num_experts)
    return Placement(np.tile(row, (num_layers, 1)), G, S, num_experts, meta={"method": "round-robin"})


def _dedupe(row: np.ndarray, G: int, S: int, E: int) -> np.ndarray:
    """Replace a duplicate expert on one GPU by the least-replicated expert that GPU lacks."""
    row = row.copy()
    for g in range(G):
        seg = row[g * S:(g + 1) * S]
        seen = set()
        for s in range(S):
            e = int(seg[s])
            if e in seen:
                cnt = np.bincount(row, minlength=E)
                cand = [x for x in np.argsort(cnt, kind="stable") if x not in seen and x not in seg]
                seg[s] = cand[0]
                e = int(seg[s])
            seen.add(e)
        row[g * S:(g + 1) * S] = seg
    return row
