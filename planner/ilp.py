"""The ILP planner: MoETuner's two stages, with replication, warm-started from greedy, decomposed.

Legend: L layers, E experts, G GPUs, S slots per GPU, c[e] replicas of expert e, w[e] = P[l, e] / c[e]
(tokens per replica; replicas split their expert's tokens equally).

Stage 1, balanced clustering (per layer, layers in parallel processes). Replica counts by
water-filling (min max_e P/c, EPLB's rule), then improved by an iterated local search over the
counts (moving redundant slots between experts) when replicating. Replicas are assigned to GPUs,
S per GPU, at most one replica of an expert per GPU, minimising the heaviest GPU's load::

    min z  s.t.  sum_g x[e,g] = c[e];  sum_e x[e,g] = S;  sum_e w[e] x[e,g] <= z;  x binary

warm-started from the greedy packing improved by a swap local search; GPUs ordered by load
(symmetry breaking). Bound: our own (mean load, water-filling, and a pigeonhole bound over the
heaviest replicas), and HiGHS's dual bound when HiGHS ran; we never trust a time-limited status.

Stage 2, cluster-to-GPU mapping per layer boundary (sequential, linear/bottleneck assignment):
with layer l's placement fixed, layer l+1's G clusters are permuted onto GPUs minimising the
heaviest GPU pair's bandwidth-weighted traffic, then (among mappings within ``map_slack`` of
it) the total.

Stage 3, refinement (MoETuner's mapping extended to re-clustering; odd/even layers in parallel
processes): with layers l-1 and l+1 fixed, layer l's assignment is re-solved to minimise
bandwidth-weighted cross-GPU traffic to both neighbours (+ G x the heaviest link when G <= 16),
subject to the slot counts and each GPU's load <= stage-1 max + ``balance_slack`` x mean load::

    min sum_{e,g} C[e,g] x[e,g] (+ lam t)  s.t. counts as above;  sum_e w[e] x[e,g] <= cap

The current assignment is feasible and is the warm start, so a sweep never makes it worse.
For small models without replication (E!/(S!)^G <= 6000 placements per layer, e.g. Mixtral on 4
GPUs) the traffic stage is solved exactly by dynamic programming over the layers (with a
Lagrangian sweep when ``balance_slack`` > 0: the sum of the layers' heaviest loads stays within
stage 1's + slack x mean), and with one expert per GPU on uniform links by per-boundary
max-weight matchings (the boundaries decouple). The exact plan replaces the MILP's when better.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .assign import bottleneck_assignment, linear_assignment
from .greedy import balanced_packing, check_capacity, items_of, replica_counts, slots_from_gpus
from .metrics import gpu_traffic
from .milp import MILP, resolve_solver
from .placement import Placement
from .topology import Topology

__all__ = ["layer_bounds", "local_search", "balance_layer", "ilp_placement", "ILPInfo"]

_EPS = 1e-9


# --- bounds ----------------------------------------------------------------------------
def layer_bounds(load_E: np.ndarray, G: int, S: int, cnt: np.ndarray | None = None) -> tuple[float, float]:
    """Lower bounds on one layer's heaviest GPU load: (global, given replica counts ``cnt``).

    global: max(mean, water-filling max P/c) holds for every placement with G*S slots;
    given counts additionally: pigeonhole over the replicas sorted by weight: for m < S, some GPU
    holds m+1 of the G*m+1 heaviest replicas, plus S-m-1 others (at least the lightest ones).
    With integral loads and no replication the bound is rounded up."""
    load_E = np.asarray(load_E, dtype=np.float64)
    E = load_E.size
    mean = load_E.sum() / G
    wf = replica_counts(load_E, G * S, G)
    glob = max(mean, float((load_E / wf).max()))
    if cnt is None:
        cnt = wf
    _, w = items_of(load_E, cnt)
    w = np.sort(w)[::-1]
    asc = w[::-1]
    best = glob
    for m in range(S):
        top = G * m + 1
        if top > w.size:
            break
        part = w[top - m - 1: top].sum()
        rest = asc[: S - m - 1].sum() if S - m - 1 > 0 else 0.0
        best = max(best, part + rest)
    if np.all(cnt == 1) and np.allclose(load_E, np.round(load_E)):
        best = max(best, math.ceil(mean - 1e-9))   # integral loads: the max is an integer
    if G * S == E:
        glob = max(glob, best)                     # no replication: counts are forced, bound is global
    return glob, best


# --- local search ------------------------------------------------------------------------
def local_search(w_E: np.ndarray, A: np.ndarray, max_iter: int = 20000, time_budget: float = 5.0) -> np.ndarray:
    """Swap replicas between the heaviest GPU and any other while that lowers the heavier of the
    two; A [G, S] expert ids (one replica of an expert per GPU at most). Returns an improved copy."""
    A = A.copy()
    G, S = A.shape
    E = w_E.size
    has = np.zeros((E, G), dtype=bool)
    has[A, np.arange(G)[:, None]] = True
    loads = w_E[A].sum(axis=1)
    gpu_flat = np.repeat(np.arange(G), S)
    t_end = time.perf_counter() + time_budget
    tol = 1e-12 * max(1.0, loads.max())
    for it in range(max_iter):
        if (it & 63) == 0 and time.perf_counter() > t_end:
            break
        g = int(np.argmax(loads))
        Lmax = loads[g]
        flat = A.ravel()
        wi = w_E[A[g]]                                   # [S]
        wj = w_E[flat]                                   # [GS]
        d = wi[:, None] - wj[None, :]                    # [S, GS]
        new_other = loads[gpu_flat][None, :] + d
        m = np.maximum(Lmax - d, new_other)
        valid = (d > tol) & (m < Lmax - tol)
        valid &= (gpu_flat != g)[None, :]
        valid &= ~has[flat, g][None, :]                  # e_j not already on g
        valid &= ~has[A[g]][:, gpu_flat]                 # e_i not already on h
        if not valid.any():
            break
        m = np.where(valid, m, np.inf)
        k = int(np.argmin(m))
        i, j = divmod(k, G * S)
        h, sj = divmod(j, S)
        ei, ej = A[g, i], A[h, sj]
        A[g, i], A[h, sj] = ej, ei
        has[ei, g] = False; has[ej, h] = False
        has[ej, g] = True; has[ei, h] = True
        loads[g] -= d[i, j]
        loads[h] += d[i, j]
    return A


def _balance_key(w_E: np.ndarray, A: np.ndarray) -> tuple:
    """Order of a GPU assignment A [G, S] of per-replica loads w_E: (heaviest GPU, how many
    GPUs tie with it, sum of squares), smaller is better."""
    ld = w_E[A].sum(axis=1)
    m = ld.max()
    return (m, int((ld >= m * (1 - 1e-12)).sum()), float((ld * ld).sum()))


def _better(k2: tuple, best: tuple) -> bool:
    """k2 beats best: a lighter heaviest GPU, or an equal one with fewer ties / a smaller sum of squares."""
    return k2[0] < best[0] - 1e-12 or (k2[0] <= best[0] + 1e-12 and k2[1:] < best[1:])


def _improve_counts_repack(load_E: np.ndarray, G: int, S: int, cnt: np.ndarray, A: np.ndarray,
                           time_budget: float = 0.5, max_tries: int = 400):
    """Local search over replica counts: give one more replica to an expert on the heaviest GPU,
    taken from the replicated expert whose replicas would stay lightest; re-pack (greedy + swaps)
    and keep the change when the heaviest GPU gets lighter. Returns (cnt, A)."""
    load_E = np.asarray(load_E, dtype=np.float64)
    w = load_E / cnt

    best = _balance_key(w, A)
    t_end = time.perf_counter() + time_budget
    tries = 0
    improved = True
    while improved and time.perf_counter() < t_end and tries < max_tries:
        improved = False
        loads = w[A].sum(axis=1)
        top = np.nonzero(loads >= loads.max() * (1 - 1e-12))[0]
        for g in top:
            for e in A[g][np.argsort(-w[A[g]], kind="stable")]:
                if cnt[e] >= G or time.perf_counter() > t_end or tries >= max_tries:
                    break
                donors = np.nonzero(cnt > 1)[0]
                donors = donors[donors != e]
                if donors.size == 0:
                    break
                after = load_E[donors] / (cnt[donors] - 1)
                for d in donors[np.argsort(after, kind="stable")[:3]]:
                    tries += 1
                    c2 = cnt.copy()
                    c2[e] += 1
                    c2[d] -= 1
                    w2 = load_E / c2
                    A2 = local_search(w2, _greedy_A(load_E, G, S, c2), time_budget=0.2)
                    k2 = _balance_key(w2, A2)
                    if _better(k2, best):
                        cnt, A, w, best = c2, A2, w2, k2
                        improved = True
                        break
                if improved:
                    break
            if improved:
                break
    return cnt, A


def _improve_counts_move(load_E, G, S, cnt, A, time_budget=0.5, max_tries=100000, n_donors=6, top_gpus=3):
    """Incremental count moves: one replica of donor d (the replicated expert whose replicas stay
    lightest) becomes a replica of an expert e on one of the heaviest GPUs, in place; then swaps."""
    load_E = np.asarray(load_E, dtype=np.float64)
    w = load_E / cnt
    best = _balance_key(w, A)
    t_end = time.perf_counter() + time_budget
    tries = 0
    improved = True
    while improved and time.perf_counter() < t_end and tries < max_tries:
        improved = False
        loads = w[A].sum(axis=1)
        gs = np.argsort(-loads)[:top_gpus]
        cand_e = []
        for g in gs:
            for e in A[g][np.argsort(-w[A[g]], kind="stable")]:
                if cnt[e] < G and e not in cand_e:
                    cand_e.append(e)
        donors_all = np.nonzero(cnt > 1)[0]
        after_all = load_E[donors_all] / np.maximum(cnt[donors_all] - 1, 1)
        order = donors_all[np.argsort(after_all, kind="stable")]
        for e in cand_e:
            if improved or time.perf_counter() > t_end: break
            k = 0
            for d in order:
                if d == e: continue
                # GPUs holding d but not e
                rows = np.nonzero((A == d).any(axis=1) & ~(A == e).any(axis=1))[0]
                if rows.size == 0: continue
                k += 1
                if k > n_donors: break
                tries += 1
                h = rows[np.argmax(w[A[rows]].sum(axis=1))]   # take d's replica from the heaviest such GPU
                A2 = A.copy(); s = int(np.nonzero(A2[h] == d)[0][0]); A2[h, s] = e
                c2 = cnt.copy(); c2[e] += 1; c2[d] -= 1
                w2 = load_E / c2
                A2 = local_search(w2, A2, time_budget=0.05)
                k2 = _balance_key(w2, A2)
                if _better(k2, best):
                    cnt, A, w, best = c2, A2, w2, k2
                    improved = True
                    break
    return cnt, A


def improve_counts(load_E: np.ndarray, G: int, S: int, cnt: np.ndarray, A: np.ndarray,
                   time_budget: float = 0.5):
    """Local search over replica counts (water-filling is optimal for the heaviest replica, not
    for the heaviest GPU): alternate in-place moves and re-packing moves until neither helps."""
    t_end = time.perf_counter() + time_budget
    load_E = np.asarray(load_E, dtype=np.float64)
    cur = float((load_E / cnt)[A].sum(axis=1).max())
    while time.perf_counter() < t_end:
        cnt, A = _improve_counts_move(load_E, G, S, cnt, A, time_budget=max(0.0, t_end - time.perf_counter()))
        cnt, A = _improve_counts_repack(load_E, G, S, cnt, A, time_budget=max(0.0, t_end - time.perf_counter()))
        new = float((load_E / cnt)[A].sum(axis=1).max())
        if new >= cur - 1e-12:
            break
        cur = new
    return cnt, A


def iterated_count_search(load_E: np.ndarray, G: int, S: int, cnt: np.ndarray, A: np.ndarray,
                          time_budget: float = 0.5, seed: int = 0):
    """Iterated local search over replica counts: ``improve_counts``, then repeated kicks (two
    random redundant replicas re-assigned to other experts in place) followed by swaps and
    ``improve_counts``; keeps the best. Deterministic for a given seed and time."""
    rng = np.random.default_rng(seed)
    load_E = np.asarray(load_E, dtype=np.float64)
    E = load_E.size
    t_end = time.perf_counter() + time_budget
    cnt, A = improve_counts(load_E, G, S, cnt, A, time_budget=0.3 * time_budget)
    best = float((load_E / cnt)[A].sum(axis=1).max())
    bc, bA = cnt, A
    while time.perf_counter() < t_end:
        c2, A2 = bc.copy(), bA.copy()
        for _ in range(2):
            donors = np.nonzero(c2 > 1)[0]
            if donors.size == 0:
                return bc, bA
            d = rng.choice(donors)
            h = rng.choice(np.nonzero((A2 == d).any(axis=1))[0])
            cand = np.nonzero((c2 < G) & ~np.isin(np.arange(E), A2[h]))[0]
            if cand.size == 0:
                continue
            e = rng.choice(cand)
            A2[h, np.nonzero(A2[h] == d)[0][0]] = e
            c2[e] += 1
            c2[d] -= 1
        A2 = local_search(load_E / c2, A2, time_budget=0.05)
        c2, A2 = improve_counts(load_E, G, S, c2, A2,
                                time_budget=max(0.0, min(0.2, t_end - time.perf_counter())))
        m = float((load_E / c2)[A2].sum(axis=1).max())
        if m < best - 1e-12:
            best, bc, bA = m, c2, A2
    return bc, bA


# --- stage 1 ---------------------------------------------------------------------------------
@dataclass
class LayerBalance:
    A: np.ndarray            # [G, S] expert ids
    cnt: np.ndarray          # [E] replica counts
    greedy_max: float
    max_load: float
    bound: float             # given the replica counts (global where counts are forced)
    global_bound: float
    solver_status: str
    solver_bound: float
    seconds: float


def _greedy_A(load_E, G, S, cnt):
    experts, weights = items_of(load_E, cnt)
    gpu = balanced_packing(weights, experts, G, S)
    return slots_from_gpus(experts, weights, gpu, G, S).reshape(G, S)


def balance_layer(load_E: np.ndarray, G: int, S: int, solver: str = "highs", time_limit: float = 5.0,
                  rel_gap: float = 1e-4, A0: np.ndarray | None = None, use_milp: bool = True) -> LayerBalance:
    """Stage 1 for one layer: greedy -> local search -> MILP (warm-started); keeps the best."""
    t0 = time.perf_counter()
    load_E = np.asarray(load_E, dtype=np.float64)
    E = load_E.size
    cnt = replica_counts(load_E, G * S, G)
    w = load_E / cnt
    if A0 is None:
        A0 = _greedy_A(load_E, G, S, cnt)
    greedy_max = float(w[A0].sum(axis=1).max())
    glob, bound = layer_bounds(load_E, G, S, cnt)
    A = local_search(w, A0, time_budget=max(0.05, 0.25 * time_limit))
    best = float(w[A].sum(axis=1).max())
    if G * S > E and best > glob * (1 + rel_gap):
        cnt, A = iterated_count_search(load_E, G, S, cnt, A, time_budget=0.7 * time_limit)
        w = load_E / cnt
        best = float(w[A].sum(axis=1).max())
        _, bound = layer_bounds(load_E, G, S, cnt)
    status, sbound = "local-search", -math.inf
    mean = load_E.sum() / G
    if use_milp and S > 1 and G > 1 and mean > 0 and best > bound * (1 + rel_gap) + _EPS:
        remaining = time_limit - (time.perf_counter() - t0)
        if remaining > 0.05:
            res_A, res_obj, sbound, status = _solve_balance_milp(w, cnt, A, G, S, solver, remaining,
                                                                 rel_gap, bound / mean)
            if res_A is not None and res_obj < best - _EPS:
                A, best = res_A, res_obj
            if np.isfinite(sbound):
                bound = max(bound, sbound * mean)
    bound = min(bound, best)
    if G * S == E:
        glob = max(glob, bound)
    return LayerBalance(A, cnt, greedy_max, best, bound, min(glob, best), status,
                        sbound * mean if np.isfinite(sbound) else -math.inf, time.perf_counter() - t0)


def _solve_balance_milp(w, cnt, A_warm, G, S, solver, time_limit, rel_gap, z_lb):
    E = w.size
    mean = w @ cnt / G
    wn = w / mean
    # order warm-start GPUs by load (descending) to match the symmetry-breaking rows
    order = np.argsort(-wn[A_warm].sum(axis=1), kind="stable")
    A_warm = A_warm[order]
    nx = E * G
    z = nx
    lb = np.zeros(nx + 1)
    ub = np.ones(nx + 1)
    integer = np.ones(nx + 1, dtype=bool)
    integer[z] = False
    full = np.nonzero(cnt >= G)[0]
    for e in full:
        lb[e * G:(e + 1) * G] = 1
    x0 = np.zeros(nx + 1)
    x0[A_warm * G + np.arange(G)[:, None]] = 1
    warm_obj = float(wn[A_warm].sum(axis=1).max())
    x0[z] = warm_obj
    lb[z] = z_lb * (1 - 1e-9)
    ub[z] = warm_obj + 1e-9
    c = np.zeros(nx + 1)
    c[z] = 1.0
    m = MILP(nx + 1, c=c, lb=lb, ub=ub, integer=integer)
    eg = np.arange(nx).reshape(E, G)
    m.add_rows(eg, 1.0, cnt, cnt)                                    # replicas of e
    m.add_rows(eg.T, 1.0, S, S)                                      # S slots per GPU
    rows = np.concatenate([eg.T, np.full((G, 1), z)], axis=1)
    coefs = np.concatenate([np.broadcast_to(wn, (G, E)), -np.ones((G, 1))], axis=1)
    m.add_rows(rows, coefs, -np.inf, 0.0)                            # load_g <= z
    if G > 1:                                                        # load_g >= load_{g+1}
        rows2 = np.concatenate([eg.T[:-1], eg.T[1:]], axis=1)
        coefs2 = np.concatenate([np.broadcast_to(wn, (G - 1, E)), -np.broadcast_to(wn, (G - 1, E))], axis=1)
        m.add_rows(rows2, coefs2, -1e-9, np.inf)
    res = m.solve(solver, time_limit=time_limit, rel_gap=rel_gap, warm_start=x0)
    if res.x is None:
        return None, math.inf, res.dual_bound, res.status
    X = res.x[:nx].reshape(E, G) > 0.5
    A = np.empty((G, S), dtype=np.int64)
    for g in range(G):
        ids = np.nonzero(X[:, g])[0]
        if ids.size != S:
            return None, math.inf, res.dual_bound, res.status
        A[g] = ids[np.argsort(-w[ids], kind="stable")]
    return A, float(w[A].sum(axis=1).max()), res.dual_bound, res.status


def _balance_job(args):
    load_E, G, S, solver, time_limit, rel_gap, use_milp = args
    return balance_layer(load_E, G, S, solver, time_limit, rel_gap, use_milp=use_milp)


# --- stage 2 -------------------------------------------------------------------------------
def _share_from_A(A: np.ndarray, E: int) -> np.ndarray:
    """[E, G] share of each expert's tokens on each GPU for an assignment A [G, S]."""
    G, S = A.shape
    M = np.zeros((E, G))
    np.add.at(M, (A, np.arange(G)[:, None]), 1.0)
    return M / np.maximum(M.sum(axis=1, keepdims=True), 1)


def map_clusters(A_prev: np.ndarray, A_next: np.ndarray, R: np.ndarray, W: np.ndarray, E: int,
                 map_slack: float = 0.1) -> np.ndarray:
    """Permute A_next's rows (clusters) onto GPUs given A_prev fixed (stage 2). W = Bref / B."""
    M_prev = _share_from_A(A_prev, E)
    M_next = _share_from_A(A_next, E)          # columns = clusters
    F = M_prev.T @ R @ M_next                  # [G(prev gpu), C(cluster)]
    # cluster c on GPU g: link (g1 -> g) carries F[g1, c], weighted by W[g1, g]
    V = (F.T[:, :, None] * W[None, :, :]).max(axis=1)            # [C, G] worst link
    Csum = np.einsum("gc,gh->ch", F, W)                           # [C, G] total weighted cross
    col, _ = bottleneck_assignment(V, Csum, slack=map_slack)
    out = np.empty_like(A_next)
    out[col] = A_next
    return out


# --- stage 3 ---------------------------------------------------------------------------------
def _refine_job(args):
    (l, A, load_E, cnt, cap, R_in, R_out, A_prev, A_next, W, solver, time_limit, rel_gap, link_rows) = args
    E = load_E.size
    G, S = A.shape
    w = load_E / cnt
    Ain = np.zeros((G, E)) if R_in is None else _share_from_A(A_prev, E).T @ R_in / cnt[None, :]
    Aout = np.zeros((E, G)) if R_out is None else R_out @ _share_from_A(A_next, E) / cnt[:, None]
    Cm = Ain.T @ W + Aout @ W.T                                   # [E, G]
    scale = max(Cm.max(), 1e-300)
    Cm = Cm / scale
    nx = E * G
    use_t = link_rows and G > 1
    nv = nx + (1 if use_t else 0)
    c = np.zeros(nv)
    c[:nx] = Cm.ravel()
    lb = np.zeros(nv)
    ub = np.ones(nv)
    integer = np.ones(nv, dtype=bool)
    eg = np.arange(nx).reshape(E, G)
    x0 = np.zeros(nv)
    x0[A * G + np.arange(G)[:, None]] = 1
    for e in np.nonzero(cnt >= G)[0]:
        lb[e * G:(e + 1) * G] = 1
    if use_t:
        t = nx
        integer[t] = False
        ub[t] = np.inf
        c[t] = float(G)          # lam: the heaviest link weighs like G links
    m = MILP(nv, c=c, lb=lb, ub=ub, integer=integer)
    m.add_rows(eg, 1.0, cnt, cnt)
    m.add_rows(eg.T, 1.0, S, S)
    m.add_rows(eg.T, np.broadcast_to(w, (G, E)), -np.inf, cap * (1 + 1e-12))
    if use_t:
        rows, coefs = [], []
        for g in range(G):
            for h in range(G):
                if h == g:
                    continue
                # link h -> g (into layer l): sum_e Ain[h, e] W[h, g] x[e, g]
                if R_in is not None:
                    rows.append(np.append(eg[:, g], t)); coefs.append(np.append(Ain[h] * W[h, g] / scale, -1.0))
                # link g -> h (out of layer l): sum_e Aout[e, h] W[g, h] x[e, g]
                if R_out is not None:
                    rows.append(np.append(eg[:, g], t)); coefs.append(np.append(Aout[:, h] * W[g, h] / scale, -1.0))
        if rows:
            m.add_rows(np.array(rows), np.array(coefs), -np.inf, 0.0)
            x0_links = max(float(np.dot(cf[:-1], x0[r[:-1]])) for r, cf in zip(rows, coefs))
            x0[t] = x0_links
    cur = m.objective_of(x0)
    res = m.solve(solver, time_limit=time_limit, rel_gap=rel_gap, warm_start=x0)
    if res.x is None or res.objective >= cur - 1e-9:
        return l, A, False
    X = res.x[:nx].reshape(E, G) > 0.5
    A_new = np.empty_like(A)
    for g in range(G):
        ids = np.nonzero(X[:, g])[0]
        if ids.size != S:
            return l, A, False
        A_new[g] = ids[np.argsort(-w[ids], kind="stable")]
    if w[A_new].sum(axis=1).max() > cap * (1 + 1e-9):
        return l, A, False
    return l, A_new, True


# --- driver ----------------------------------------------------------------------------------
@dataclass
class ILPInfo:
    solver: str
    greedy_max_mean: float = math.nan
    bound_max_mean: float = math.nan          # sum_l bound_l / sum_l mean_l
    global_bound_max_mean: float = math.nan
    layer_status: list = field(default_factory=list)
    stage_seconds: dict = field(default_factory=dict)
    refine_improved: int = 0
    exact_traffic: bool = False


def _pool_map(fn, jobs, n_jobs, progress=None, desc=""):
    out = []
    bar = _bar(progress, len(jobs), desc)
    if n_jobs <= 1 or len(jobs) <= 1:
        for j in jobs:
            out.append(fn(j))
            bar.update(1)
    else:
        import multiprocessing as mp
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(min(n_jobs, len(jobs))) as pool:
            for r in pool.imap(fn, jobs):
                out.append(r)
                bar.update(1)
    bar.close()
    return out


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(progress, total, desc):
    if not progress:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def ilp_placement(loads_LE: np.ndarray, topo: Topology, trans: np.ndarray | None = None,
                  solver: str = "auto", time_limit: float = 60.0, rel_gap: float = 1e-4,
                  n_jobs: int | None = None, balance_slack: float = 0.0, map_slack: float = 0.1,
                  refine_sweeps: int = 2, progress: bool = False) -> tuple[Placement, ILPInfo]:
    """The full ILP plan (stages 1-3, see the module doc). ``time_limit`` is the wall budget (s)."""
    t_start = time.perf_counter()
    solver = resolve_solver(solver)
    loads_LE = np.atleast_2d(np.asarray(loads_LE, dtype=np.float64))
    L, E = loads_LE.shape
    G, S = topo.num_gpus, topo.slots_per_gpu
    check_capacity(E, topo)
    n_jobs = max(1, int(n_jobs or os.cpu_count() or 1))
    info = ILPInfo(solver=solver)
    # stage 1 budget: half of the wall budget (all of it without transitions)
    have_traffic = trans is not None and L > 1 and G > 1
    share1 = 0.5 if have_traffic else 0.9
    waves = math.ceil(L / n_jobs)
    per_layer = max(0.2, 0.6 * share1 * time_limit / waves)   # 0.6: model building and solver overshoot
    jobs = [(loads_LE[l], G, S, solver, per_layer, rel_gap, True) for l in range(L)]
    res = _pool_map(_balance_job, jobs, n_jobs, progress, "ILP stage 1 (balance)")
    info.stage_seconds["balance"] = time.perf_counter() - t_start
    A = [r.A for r in res]
    cnt = [r.cnt for r in res]
    mean = loads_LE.sum(axis=1) / G
    msum = mean.sum() if mean.sum() > 0 else 1.0
    info.greedy_max_mean = float(sum(r.greedy_max for r in res) / msum)
    info.bound_max_mean = float(sum(r.bound for r in res) / msum)
    info.global_bound_max_mean = float(sum(r.global_bound for r in res) / msum)
    info.layer_status = [r.solver_status for r in res]
    if have_traffic:
        t2 = time.perf_counter()
        bw = topo.bandwidth_matrix()
        bref = np.min(bw[np.isfinite(bw)]) if np.isfinite(bw).any() else 1.0
        W = np.where(np.isfinite(bw), bref / bw, 0.0)
        for l in range(L - 1):
            A[l + 1] = map_clusters(A[l], A[l + 1], trans[l], W, E, map_slack)
        info.stage_seconds["map"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        caps = [r.max_load + balance_slack * mean[l] for l, r in enumerate(res)]
        remaining = time_limit - (time.perf_counter() - t_start)
        n_sub = max(1, refine_sweeps * 2)
        link_rows = G <= 16
        for sweep in range(refine_sweeps):
            for parity in (1, 0):
                remaining = time_limit - (time.perf_counter() - t_start)
                if remaining <= 0.2:
                    break
                ls = [l for l in range(L) if l % 2 == parity]
                waves = math.ceil(len(ls) / n_jobs)
                per = max(0.1, remaining / max(1, n_sub) / max(1, waves))
                n_sub -= 1
                jobs = [(l, A[l], loads_LE[l], cnt[l], caps[l],
                         trans[l - 1] if l > 0 else None, trans[l] if l < L - 1 else None,
                         A[l - 1] if l > 0 else None, A[l + 1] if l < L - 1 else None,
                         W, solver, per, rel_gap, link_rows) for l in ls]
                for l, A_new, improved in _pool_map(_refine_job, jobs, n_jobs, progress,
                                                    f"ILP stage 3 (traffic, sweep {sweep + 1})"):
                    A[l] = A_new
                    info.refine_improved += int(improved)
        if S == 1 and G == E and topo.num_nodes == 1 and np.allclose(W[~np.eye(G, dtype=bool)], W[0, 1]):
            # one expert per GPU, uniform links: the boundaries decouple (any expert-to-expert matching
            # between layers is realisable), so per-boundary max-weight matchings are exactly optimal
            A_s1 = [A[0]]
            for l in range(L - 1):
                col = linear_assignment(-trans[l])            # expert at l -> expert at l+1 on the same GPU
                A_s1.append(col[A_s1[-1]])
            if weighted_traffic(A_s1, trans, W, E) < weighted_traffic(A, trans, W, E) - 1e-9:
                A = A_s1
                info.exact_traffic = True
        if all(np.all(c == 1) for c in cnt):
            A_dp = _dp_with_slack(loads_LE, res, mean, trans, W, G, S, balance_slack)
            if A_dp is not None:
                agg = lambda AA: sum(float((loads_LE[l] / cnt[l])[AA[l]].sum(axis=1).max()) for l in range(L))
                if weighted_traffic(A_dp, trans, W, E) < weighted_traffic(A, trans, W, E) - 1e-9 and \
                        agg(A_dp) <= sum(r.max_load for r in res) + balance_slack * mean.sum() + 1e-9:
                    A = A_dp
                    info.exact_traffic = True
        info.stage_seconds["refine"] = time.perf_counter() - t3
    phy = np.stack([a.reshape(-1) for a in A])
    info.stage_seconds["total"] = time.perf_counter() - t_start
    return Placement(phy, G, S, E, meta={"method": f"ilp-{solver}"}), info


# --- stage 3, exact for small models: dynamic programming over layers -------------------------
def _ordered_states(E: int, G: int, S: int, limit: int):
    """All assignments of E experts (no replication) to G GPUs x S slots, as [N, G, S] (None if > limit)."""
    from itertools import combinations
    from math import factorial
    n = factorial(E)
    for _ in range(G):
        n //= factorial(S)
    if n > limit:
        return None
    out = []

    def rec(remaining, acc):
        if not remaining:
            out.append(acc)
            return
        for c in combinations(remaining, S):
            rest = [e for e in remaining if e not in c]
            rec(rest, acc + [c])
    rec(list(range(E)), [])
    return np.asarray(out, dtype=np.int64)


def dp_traffic(loads_LE: np.ndarray, caps: list, trans: np.ndarray, W: np.ndarray, G: int, S: int,
               max_states: int = 6000, mu: float = 0.0, _cache: dict | None = None):
    """Exact minimum of sum_l sum_{g1,g2} traffic_l(g1, g2) W[g1, g2] / total pairs
    + mu * sum_l maxload_l / sum_l meanload_l, subject to each layer's load cap, for small models
    without replication (E!/(S!)^G <= max_states). Returns (A, objective) or None if too big."""
    L, E = loads_LE.shape
    if G * S != E:
        return None
    states = _ordered_states(E, G, S, max_states)
    if states is None:
        return None
    N = states.shape[0]
    tot = max(float(trans.sum()), 1e-300)
    msum = max(float(loads_LE.sum()) / G, 1e-300)
    X = np.zeros((N, E, G))
    X[np.arange(N)[:, None, None], states, np.arange(G)[None, :, None]] = 1.0
    Xf = X.reshape(N, E * G)
    feas, pen = [], []
    for l in range(L):
        ld = loads_LE[l][states].sum(axis=2).max(axis=1)
        ok = np.nonzero(ld <= caps[l] * (1 + 1e-12))[0]
        if ok.size == 0:
            return None
        feas.append(ok)
        pen.append(mu * ld[ok] / msum)
    V = pen[0].copy()
    back = []
    for l in range(L - 1):
        key = (l, feas[l].size, feas[l + 1].size)
        if _cache is not None and key in _cache:
            tr = _cache[key]
        else:
            K = np.kron(trans[l], W) / tot                    # (e1 g1),(e2 g2) -> R W
            a, b = Xf[feas[l]], Xf[feas[l + 1]]
            tr = ((a @ K) @ b.T).astype(np.float32)           # [N_l, N_l+1]
            if _cache is not None and tr.size * len(trans) < 2e8:
                _cache[key] = tr
        cost = tr + V[:, None].astype(np.float32)
        arg = np.argmin(cost, axis=0)
        V = cost[arg, np.arange(cost.shape[1])].astype(np.float64) + pen[l + 1]
        back.append(arg)
    k = int(np.argmin(V))
    idx = [0] * L
    idx[L - 1] = k
    for l in range(L - 2, -1, -1):
        idx[l] = int(back[l][idx[l + 1]])
    A = []
    for l in range(L):
        st = states[feas[l][idx[l]]]
        w = loads_LE[l]
        A.append(np.stack([np.asarray(r)[np.argsort(-w[np.asarray(r)], kind="stable")] for r in st]))
    return A, float(V[k])


def _dp_with_slack(loads_LE, res, mean, trans, W, G, S, slack, iters: int = 14):
    """DP for the traffic optimum whose total heaviest-GPU load stays within ``slack`` x total
    mean of stage 1's: Lagrangian sweep over the load weight mu (bisection), keeping the feasible
    solution with the least traffic. Exact at slack 0 (caps = stage-1 optimum per layer)."""
    L = loads_LE.shape[0]
    base = sum(r.max_load for r in res)
    budget = base + slack * mean.sum()
    if slack <= 0:
        out = dp_traffic(loads_LE, [r.max_load for r in res], trans, W, G, S)
        return None if out is None else out[0]
    caps = [r.max_load + 4 * slack * mean[l] for l, r in enumerate(res)]
    cache: dict = {}
    msum = loads_LE.sum() / G

    def run(mu):
        out = dp_traffic(loads_LE, caps, trans, W, G, S, mu=mu, _cache=cache)
        if out is None:
            return None, np.inf, np.inf
        A = out[0]
        ld = sum(float(loads_LE[l][A[l]].sum(axis=1).max()) for l in range(L))
        return A, ld, weighted_traffic(A, trans, W, loads_LE.shape[1])
    A0, ld0, tr0 = run(0.0)
    if A0 is None:
        return None
    if ld0 <= budget + 1e-9:
        return A0
    best = None
    lo, hi = 0.0, 1.0
    while True:                                  # find a mu that meets the budget
        A1, ld1, tr1 = run(hi)
        if ld1 <= budget + 1e-9:
            best = (tr1, A1)
            break
        hi *= 4
        if hi > 1e6:
            return None
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        Am, ldm, trm = run(mid)
        if ldm <= budget + 1e-9:
            hi = mid
            if trm < best[0]:
                best = (trm, Am)
        else:
            lo = mid
    return best[1]


def weighted_traffic(A: list, trans: np.ndarray, W: np.ndarray, E: int) -> float:
    """sum over boundaries of sum_{g1,g2} traffic(g1, g2) W[g1, g2] for assignments A[l] [G, S]
    (layer l's experts at one end of a boundary, layer l+1's at the other). It decides whether
    the exact traffic plans (DP, matchings) replace the MILP's and picks the Lagrangian sweep's
    best, so it counts pairs with the scoring's own formula, ``metrics.gpu_traffic``."""
    G, S = A[0].shape
    pl = Placement(np.stack([np.asarray(a).reshape(-1) for a in A]), G, S, E)
    return float((gpu_traffic(pl, trans[: len(A) - 1]) * W).sum())


# --- stage 4 (small models): one joint MILP over all layers ------------------------------------
def joint_polish(A: list, loads_LE: np.ndarray, cnt: list, caps: list, trans: np.ndarray,
                 solver: str, time_limit: float, rel_gap: float = 1e-4):
    """Maximise same-GPU consecutive-layer pairs over all layers at once (linearised products
    y[l,e1,e2,g] <= x[l,e1,g], x[l+1,e2,g]), load caps kept, warm-started from ``A``.

    Only for small models (E*G*L binaries in the thousands). Returns (A, improved)."""
    L, E = loads_LE.shape
    G, S = A[0].shape
    nx = L * E * G
    xi = np.arange(nx).reshape(L, E, G)
    pairs = [np.argwhere(trans[l] > 0) for l in range(L - 1)]
    ny = sum(p.shape[0] for p in pairs) * G
    n = nx + ny
    c = np.zeros(n)
    lb = np.zeros(n)
    ub = np.ones(n)
    integer = np.zeros(n, dtype=bool)
    integer[:nx] = True
    tot = trans.sum()
    x0 = np.zeros(n)
    for l in range(L):
        x0[xi[l][A[l], np.arange(G)[:, None]]] = 1
        for e in np.nonzero(cnt[l] >= G)[0]:
            lb[xi[l, e]] = 1
    rows_a, rows_b, coefs = [], [], []
    k = nx
    y_rows = []
    for l in range(L - 1):
        p = pairs[l]
        if p.size == 0:
            continue
        m = p.shape[0]
        ids = k + np.arange(m * G).reshape(m, G)
        w = trans[l][p[:, 0], p[:, 1]] / (cnt[l][p[:, 0]] * cnt[l + 1][p[:, 1]])
        c[ids] = -(w / tot)[:, None]
        x0[ids] = np.minimum(x0[xi[l][p[:, 0]]], x0[xi[l + 1][p[:, 1]]])
        y_rows.append((ids.ravel(), xi[l][p[:, 0]].ravel(), xi[l + 1][p[:, 1]].ravel()))
        k += m * G
    mdl = MILP(n, c=c, lb=lb, ub=ub, integer=integer)
    for l in range(L):
        w_l = loads_LE[l] / cnt[l]
        mdl.add_rows(xi[l], 1.0, cnt[l], cnt[l])
        mdl.add_rows(xi[l].T, 1.0, S, S)
        mdl.add_rows(xi[l].T, np.broadcast_to(w_l, (G, E)), -np.inf, caps[l] * (1 + 1e-12))
    for ids, xa, xb in y_rows:
        mdl.add_rows(np.stack([ids, xa], 1), np.array([1.0, -1.0]), -np.inf, 0.0)
        mdl.add_rows(np.stack([ids, xb], 1), np.array([1.0, -1.0]), -np.inf, 0.0)
    cur = mdl.objective_of(x0)
    res = mdl.solve(solver, time_limit=time_limit, rel_gap=rel_gap, warm_start=x0)
    if res.x is None or res.objective >= cur - 1e-9:
        return A, False, res
    X = res.x[:nx].reshape(L, E, G) > 0.5
    out = []
    for l in range(L):
        w_l = loads_LE[l] / cnt[l]
        A_l = np.empty_like(A[l])
        for g in range(G):
            ids = np.nonzero(X[l, :, g])[0]
            if ids.size != S:
                return A, False, res
            A_l[g] = ids[np.argsort(-w_l[ids], kind="stable")]
        if w_l[A_l].sum(axis=1).max() > caps[l] * (1 + 1e-9):
            return A, False, res
        out.append(A_l)
    return out, True, res
